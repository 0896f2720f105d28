"""What every stage shares: params, one-line errors, atomic outputs, metrics files, device checks."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

SPLITS = Path("data/split")  # written by stages/data.py: <task>/{train,eval}.jsonl

log = logging.getLogger("stages")

PARAMS_FILE = Path("params.yaml")


class StageError(Exception):
    """A problem the user can fix. Printed as one line; the stage exits with status 1."""


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: not found (run stages from the repository root)")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StageError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(params, dict):
        raise StageError(f"{path}: expected a mapping at the top level")
    return params


def require(params: dict[str, Any], dotted: str) -> Any:
    """params['a']['b'] for 'a.b', or a StageError naming the missing key."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StageError(f"{PARAMS_FILE}: missing key '{dotted}'")
        node = node[part]
    return node


def task_settings(params: dict[str, Any], task: str) -> dict[str, Any]:
    """Shared finetune settings with finetune.tasks.<task> laid over them."""
    finetune = dict(require(params, "finetune"))
    tasks = finetune.pop("tasks", None) or {}
    if task not in require(params, "tasks"):
        raise StageError(f"{PARAMS_FILE}: task '{task}' is not listed under 'tasks'")
    return {**finetune, **(tasks.get(task) or {})}


def check_device(name: str) -> str:
    """Fail at once, in one line, when the configured device does not exist here."""
    if name == "cpu":
        return name
    if name != "cuda":
        raise StageError(f"{PARAMS_FILE}: device.name must be 'cpu' or 'cuda', not '{name}'")
    import torch

    if not torch.cuda.is_available():
        raise StageError("device=cuda but no CUDA GPU is visible to torch here; use device=cpu")
    return name


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise StageError(f"{PARAMS_FILE}: device.dtype '{name}' is not one of float32, bfloat16, float16") from None


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a scratch folder that replaces `dest` only if the block finishes: no half-written outputs."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    tmp.rename(dest)


def write_json(path: Path | str, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_metrics(path: Path | str) -> dict[str, Any]:
    """An upstream stage's metrics JSON, or {} when that stage has not written it (callers then measure themselves)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def dir_size_mb(path: Path | str) -> float:
    """Size on disk of a file, or of every file under a folder, in MB."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    return round(total / 1e6, 2)


def remove_outputs(*paths: Path | str) -> None:
    """Delete outputs so a failed run leaves nothing for DVC to cache."""
    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def main(fn: Callable[[list[str]], None]) -> Callable[[list[str] | None], None]:
    """Wrap a stage entry point: logging set up, errors end as one line on stderr and exit 1.

    STAGE_DEBUG=1 re-raises instead, to see the traceback.
    """

    @functools.wraps(fn)
    def run(argv: list[str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        for noisy in ("httpx", "urllib3", "azure", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        debug = os.environ.get("STAGE_DEBUG") == "1"
        module = sys.modules.get(fn.__module__)
        spec = getattr(module, "__spec__", None)  # under `python -m`, __module__ is "__main__"
        stage = (spec.name if spec else fn.__module__).rsplit(".", 1)[-1]
        try:
            fn(sys.argv[1:] if argv is None else argv)
        except StageError as exc:
            if debug:
                raise
            print(f"{stage}: error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(f"{stage}: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as exc:  # a bug or an environment problem: still one line, traceback on request
            if debug:
                raise
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{stage}: error: {type(exc).__name__}: {msg} (STAGE_DEBUG=1 shows the traceback)", file=sys.stderr)
            sys.exit(1)

    return run
