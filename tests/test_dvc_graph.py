"""dvc.yaml cannot drift from the code: each stage's code deps are exactly the repo modules its entry point imports.

The derivation lives in tools/code_deps.py (`make deps` rewrites dvc.yaml from it).
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.helpers import ROOT
from tools.code_deps import code_deps, differences, imported_modules, rewrite

STAGES = sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_equal_the_stage_imports(name):
    add, remove = differences().get(name, ([], []))
    assert not add and not remove, f"dvc.yaml stage '{name}': add {add}, remove {remove} (make deps)"


def test_deleting_one_dep_line_is_caught_and_make_deps_restores_it(tmp_path):
    """Negative control on a copy of the repo: drop evaluate's olive_lab/onnx/check.py line."""
    for folder in ("olive_lab", "stages"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    text = (ROOT / "dvc.yaml").read_text()
    broken = text.replace("      - olive_lab/onnx/check.py\n", "", 1)  # the first stage that lists it
    assert broken != text
    (tmp_path / "dvc.yaml").write_text(broken)
    assert differences(tmp_path), "a deleted dep line went unnoticed"
    rewrite(tmp_path)
    assert differences(tmp_path) == {}
    assert (tmp_path / "dvc.yaml").read_text() == text


def test_the_deps_reader_follows_imports_transitively():
    deps = code_deps(ROOT / "stages/evaluate.py")
    assert "olive_lab/onnx/check.py" in deps  # stages/evaluate.py -> olive_lab/evaluate.py -> olive_lab/onnx/check.py
    assert "olive_lab/__init__.py" in deps and "stages/__init__.py" in deps
    assert "olive_lab/data.py" not in deps  # the validator: editing it must not re-run evaluate


def test_no_entry_point_is_imported_as_a_library():
    """chat/, bench/, tools/ and olive_lab/ never import stages/ (entry points), tests/ or patch sys.path."""
    offenders = []
    for folder in ("chat", "bench", "tools", "olive_lab"):
        for path in (ROOT / folder).rglob("*.py"):
            mods = imported_modules(path)
            if (
                any(m == "stages" or m.startswith(("stages.", "tests")) for m in mods)
                or "sys.path.insert" in path.read_text()
            ):
                offenders.append(path.relative_to(ROOT).as_posix())
    assert not offenders, f"these import stages/ or tests/, or patch sys.path: {offenders}"


def test_a_package_s_compiled_sources_are_code_deps_of_its_importers():
    """olive_lab/kernels compiles its C++/CUDA sources into the model folder: editing one re-runs optimize."""
    deps = code_deps(ROOT / "stages/optimize.py")
    assert {"olive_lab/kernels/lora_resident.cc", "olive_lab/kernels/lora_resident_cuda.cu"} <= deps
    assert not any(d.startswith("olive_lab/kernels/") for d in code_deps(ROOT / "stages/data.py"))
