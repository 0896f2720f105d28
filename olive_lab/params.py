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
