"""Compose conf/ into params.yaml exactly as `dvc exp run` does (DVC's own Hydra helper).

python -m stages.params [OVERRIDE ...] [--out FILE]      e.g. model=tiny finetune.max_steps=5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.common import PARAMS_FILE, StageError, main

CONF_DIR = Path("conf")


def compose_params(out: Path | str, overrides: list[str] | None = None, conf_dir: Path | str = CONF_DIR) -> None:
    from dvc.utils.hydra import compose_and_dump

    try:
        compose_and_dump(Path(out), str(Path(conf_dir).resolve()), None, "config", str(Path.cwd()), overrides or [])
    except Exception as exc:  # Hydra's own messages name the bad override or file
        raise StageError(f"{conf_dir}: cannot compose config: {exc}".replace("\n", " ")) from exc


@main
def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.params", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default=str(PARAMS_FILE))
    args = parser.parse_args(argv)
    compose_params(args.out, args.overrides)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run()
