"""params.yaml: read it, look keys up with one-line errors, compose it from conf/ (DVC's own Hydra helper)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from olive_lab.errors import StageError


def load_params(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: not found (run stages from the repository root)")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise StageError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(params, dict):
        raise StageError(f"{path}: expected a mapping at the top level")
    return params


def require(params: dict[str, Any], dotted: str, source: Path | str = "params.yaml") -> Any:
    """params['a']['b'] for 'a.b', or a StageError naming the missing key."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StageError(f"{source}: missing key '{dotted}'")
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# What a param may hold: a kind's words for the error message, and its test. YAML reads `1e-3` as a string (it wants
# `1.0e-3`), and `yes` or `"4"` are not numbers: each gets the same one line naming the key.
KINDS: dict[str, tuple[str, Any]] = {
    "int>0": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "int>=0": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "int>0|null": ("a positive integer or null", lambda v: v is None or (_is_int(v) and v > 0)),
    "number>0": ("a positive number", lambda v: _is_number(v) and v > 0),
    "number[0,1)": ("a number from 0 up to (not including) 1", lambda v: _is_number(v) and 0 <= v < 1),
    "number(0,1)": ("a number between 0 and 1", lambda v: _is_number(v) and 0 < v < 1),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "layers": (
        "'sensitive', a list of layer indices or null",
        lambda v: v is None or v == "sensitive" or (isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
    ),
    "names": (
        "a list of module names",
        lambda v: isinstance(v, list) and all(isinstance(i, str) and i.strip() for i in v),
    ),
}


def check_params(
    params: dict[str, Any],
    spec: dict[str, str | tuple],
    prefix: str = "",
    present_only: bool = False,
    source: Path | str = "params.yaml",
) -> None:
    """Every key of `spec` (dotted, under `prefix`) holds what its kind says (a KINDS name, or a tuple of the allowed
    values); else a StageError naming the file and the key. Stages call it first, before reading any input."""
    for dotted, kind in spec.items():
        full = f"{prefix}.{dotted}" if prefix else dotted
        node: Any = params
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if present_only:
                    break
                raise StageError(f"{source}: missing key '{full}'")
            node = node[part]
        else:
            if isinstance(kind, tuple):
                if node not in kind:
                    raise StageError(f"{source}: {full} must be one of {', '.join(map(str, kind))}, not {node!r}")
            elif not KINDS[kind][1](node):
                raise StageError(f"{source}: {full} must be {KINDS[kind][0]}, not {node!r}")


def task_settings(params: dict[str, Any], task: str, source: Path | str = "params.yaml") -> dict[str, Any]:
    """Shared finetune settings with finetune.tasks.<task> laid over them."""
    finetune = dict(require(params, "finetune", source))
    tasks = finetune.pop("tasks", None) or {}
    if task not in require(params, "tasks", source):
        raise StageError(f"{source}: task '{task}' is not listed under 'tasks'")
    return {**finetune, **(tasks.get(task) or {})}


def compose_params(out: Path | str, overrides: list[str] | None, conf_dir: Path | str) -> None:
    """Write `out` from the Hydra config in `conf_dir` exactly as `dvc exp run` does."""
    from dvc.utils.hydra import compose_and_dump

    try:
        compose_and_dump(Path(out), str(Path(conf_dir).resolve()), None, "config", str(Path.cwd()), overrides or [])
    except Exception as exc:  # Hydra's own messages name the bad override or file
        raise StageError(f"{conf_dir}: cannot compose config: {exc}".replace("\n", " ")) from exc
