"""Stage base: materialize the base model as a Hugging Face folder (models/base/), from params `model`."""

from __future__ import annotations

import logging
import time

from olive_lab import paths
from olive_lab.base_model import materialize
from olive_lab.cli import entry_point
from olive_lab.files import write_json
from olive_lab.params import load_params, require

log = logging.getLogger("stages.base")


@entry_point
def run(argv: list[str]) -> None:
    params = load_params(paths.PARAMS_FILE)
    start = time.time()
    info = materialize(require(params, "model"), paths.BASE_MODEL)
    seconds = round(time.time() - start, 1)
    write_json(paths.BASE_METRICS, {"model": params["model"]["name"], **info})
    write_json(paths.perf_file("base"), {"seconds": seconds})
    log.info("wrote %s (%s M parameters) in %.0f s", paths.BASE_MODEL, info["params_m"], seconds)


if __name__ == "__main__":
    run()
