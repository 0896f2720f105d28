"""Shared fixtures. Models are built locally (no downloads): a random-init tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_params() -> dict:
    return yaml.safe_load((ROOT / "conf/model/tiny.yaml").read_text())


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random-init Llama (2 layers, hidden 64) saved as a Hugging Face folder, built once per session."""
    from olive_lab.base_model import materialize

    out = tmp_path_factory.mktemp("tiny") / "base"
    materialize(tiny_model_params(), out)
    return out


@pytest.fixture()
def tiny_base_copy(tiny_base, tmp_path) -> Path:
    """A private copy for tests that modify the model folder."""
    dest = tmp_path / "base"
    shutil.copytree(tiny_base, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Two random LoRA adapters (r=4) on `tiny_base`, named like the real tasks: {"travel": dir, "trip_json": dir}."""
    from olive_lab.lora import random_adapter

    root = tmp_path_factory.mktemp("tiny_adapters")
    return {name: random_adapter(tiny_base, root / name, seed) for seed, name in enumerate(["travel", "trip_json"])}


@pytest.fixture(scope="session")
def tiny_onnx(tiny_base, tiny_adapters, tmp_path_factory) -> Path:
    """A folder laid out like models/onnx: model/ (ORT GenAI int4, with LoRA inputs) + adapters/<task>.onnx_adapter."""
    from olive_lab.onnx.export import build_onnx

    out = tmp_path_factory.mktemp("tiny_onnx") / "onnx"
    build_onnx(
        tiny_base, out, tiny_adapters, precision="int4", block_size=32, accuracy_level=4, execution_provider="cpu"
    )
    return out
