"""Stage data: validate data/<task>.jsonl and split it into data/split/<task>/{train,eval}.jsonl.

A bad row stops the stage with `file:line: reason` and exit 1; nothing is written then.
"""

from __future__ import annotations

from olive_lab import paths
from olive_lab.cli import entry_point
from olive_lab.data import prepare
from olive_lab.files import write_json
from olive_lab.params import load_params, require


@entry_point
def run(argv: list[str]) -> None:
    params = load_params(paths.PARAMS_FILE)
    counts = prepare(require(params, "tasks"), require(params, "data"), paths.DATA_DIR, paths.SPLITS)
    write_json(paths.DATA_METRICS, counts)


if __name__ == "__main__":
    run()
