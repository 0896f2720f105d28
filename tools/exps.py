"""make exps: the experiments side by side, in the columns that compare them, within 120 terminal columns.

`dvc exp show` prints every param and metric (about 250 columns, names up to 45 characters), and even its `--keep`
view of the key ones does not fit 120 columns: it hides the quantize method behind "…". This reads its CSV and prints
the key columns under short headers. Arguments go to `dvc exp show` (e.g. `make exps EXP_ARGS=-A` for every branch).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys

# (dvc's column name, short header): the experiment, what it changed, and what it measured
KEY_COLUMNS = (
    ("model.name", "model"),
    ("quantize.method", "quantize"),
    ("quantize.int8_layers", "int8 layers"),
    ("ppl_over_fp32", "ppl/fp32"),
    ("onnx+travel.travel_loss", "travel loss"),
    ("onnx+trip_json.field_accuracy", "trip fields"),
    ("onnx+trip_json.trip_json_ood.field_accuracy", "OOD fields"),
    ("onnx.decode_tok_s", "tok/s"),
)


def table(csv_text: str) -> str:
    """The rows of `dvc exp show --csv` as an aligned text table of KEY_COLUMNS; a column DVC does not have is '-'."""
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    header = ["experiment", *(short for _, short in KEY_COLUMNS)]
    body = [
        [row.get("Experiment") or row.get("rev") or "?", *(row.get(name) or "-" for name, _ in KEY_COLUMNS)]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *body])  # fmt: skip


def main(argv: list[str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--csv", *argv], capture_output=True, text=True
    )
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        print(f"exps: dvc exp show failed: {message[-1] if message else f'exit {proc.returncode}'}", file=sys.stderr)
        return 1
    print(table(proc.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
