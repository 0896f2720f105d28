"""The contract between quantize and the ONNX export: which weights sit on which int4 grid.

The quantize stage writes it into the quantized folder; the export checks its block size against it and the grid
check compares exactly those weights.
"""

from __future__ import annotations

import json
from pathlib import Path

META_FILE = "int4_grid.json"
# each quantized weight's scales and zero points ("<weight>.scale", "<weight>.zero_point": [out, in / group]), so
# the export writes the very grid torch used (olive_lab.onnx.grid)
GRID_FILE = "grid.safetensors"


def read_grid(model_dir: Path) -> dict:
    """{method, bits, group_size, symmetric, quantized: [weight names], int8: [those at 8 bits]}, or {} when the
    folder has none."""
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}
