"""Stage data: validate data/<task>.jsonl and split it into data/split/<task>/{train,eval}.jsonl.

A bad row stops the stage with `file:line: reason` and exit 1; nothing is written then.
"""

from __future__ import annotations

from olive_lab import paths
from olive_lab.cli import entry_point
from olive_lab.data import prepare
from olive_lab.files import write_json
from olive_lab.params import check_params, load_params, require

# Checked before any data is read: a bad value stops the stage in one line naming the key.
PARAMS = {
    "data.eval_fraction": "number(0,1)",
    "data.seed": "int>=0",
    "data.max_prompt_chars": "int>0",
    "data.max_response_chars": "int>0",
}


@entry_point
def run(argv: list[str]) -> None:
    params = load_params(paths.PARAMS_FILE)
    check_params(params, PARAMS)
    counts = prepare(require(params, "tasks"), require(params, "data"), paths.DATA_DIR, paths.SPLITS)
    write_json(paths.DATA_METRICS, counts)


if __name__ == "__main__":
    run()
