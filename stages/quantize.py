"""Stage quantize: int4 by quantize.method, optionally with int8 sensitive layers (models/quantized/), and the plain
RTN int4 control, each against fp32 (metrics/quantize.json)."""

from __future__ import annotations

from olive_lab import paths
from olive_lab.cli import entry_point
from olive_lab.device import check_device
from olive_lab.files import write_json
from olive_lab.params import check_params, load_params, require
from olive_lab.quantize import METHODS, compare_quantizers

# Checked before any model or data is read: a bad value stops the stage in one line naming the key.
PARAMS = {
    "quantize.method": METHODS,
    "quantize.int8_layers": "layers",
    "quantize.int8_modules": "names",
    "quantize.bits": (4,),
    "quantize.symmetric": "bool",
    "quantize.calib_samples": "int>0",
    "quantize.calib_seq_len": "int>0",
    "quantize.n_grid": "int>0",
    "model.group_size": "int>0",
    "data.seed": "int>=0",
    "evaluate.max_seq_len": "int>0",
}


@entry_point
def run(argv: list[str]) -> None:
    params = load_params(paths.PARAMS_FILE)
    check_params(params, PARAMS)
    metrics, perf = compare_quantizers(
        paths.BASE_MODEL,
        paths.QUANTIZED,
        paths.SPLITS,
        require(params, "tasks"),
        require(params, "quantize"),
        group_size=require(params, "model.group_size"),
        seed=require(params, "data.seed"),
        max_len=require(params, "evaluate.max_seq_len"),
        device=check_device(require(params, "device.name")),
        mappings=require(params, "model.awq_mappings"),
    )
    write_json(paths.QUANTIZE_METRICS, metrics)
    write_json(paths.perf_file("quantize"), perf)


if __name__ == "__main__":
    run()
