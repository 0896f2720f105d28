"""Compose conf/ into params.yaml exactly as `dvc exp run` does (DVC's own Hydra helper).

python -m tools.params [OVERRIDE ...] [--out FILE]      e.g. model=tiny finetune.max_steps=5
"""

from __future__ import annotations

import argparse

from olive_lab import paths
from olive_lab.cli import entry_point
from olive_lab.params import compose_params


@entry_point
def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.params", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default=str(paths.PARAMS_FILE))
    args = parser.parse_args(argv)
    compose_params(args.out, args.overrides, paths.CONF_DIR)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run()
