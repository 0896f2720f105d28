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
    from stages.base import materialize

    out = tmp_path_factory.mktemp("tiny") / "base"
    materialize(tiny_model_params(), out)
    return out


@pytest.fixture()
def tiny_base_copy(tiny_base, tmp_path) -> Path:
    """A private copy for tests that modify the model folder."""
    dest = tmp_path / "base"
    shutil.copytree(tiny_base, dest)
    return dest
