"""dvc.yaml cannot drift from the code: each stage's code deps are exactly the repo modules its entry point imports.

The imports are read with `ast` (every import statement, also those inside functions), followed transitively
inside the repository; importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PACKAGES = ("olive_lab", "stages")  # what the stages may import from this repository


def module_file(module: str) -> Path | None:
    """The repo file behind a dotted module name, or None when it is not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names of everything `path` imports, with each package on the way (their __init__ runs too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def code_deps(entry: Path) -> set[str]:
    """Repo files `entry` runs: itself, its package's __init__, and everything it imports, transitively."""
    todo, seen = [entry], set()
    package_init = entry.parent / "__init__.py"
    if package_init.is_file():
        todo.append(package_init)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for m in imported_modules(path) if (f := module_file(m)) is not None]
    return {p.relative_to(ROOT).as_posix() for p in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def entry_module(cmd: str) -> Path:
    words = cmd.split()
    assert words[:2] == ["python", "-m"], f"stage command {cmd!r} is not `python -m <module>`"
    return module_file(words[2])


@pytest.mark.parametrize("name", sorted(stages()))
def test_code_deps_equal_the_stage_imports(name):
    stage = stages()[name]
    stage = stage.get("do", stage)  # foreach stages
    declared = {d for d in stage["deps"] if d.endswith(".py")}
    expected = code_deps(entry_module(stage["cmd"]))
    missing, extra = sorted(expected - declared), sorted(declared - expected)
    assert not missing and not extra, f"dvc.yaml stage '{name}': add {missing}, remove {extra}"


def test_the_deps_reader_follows_imports_transitively():
    """A negative control: the evaluate stage reaches the ONNX check through the evaluate library only."""
    deps = code_deps(ROOT / "stages/evaluate.py")
    assert "olive_lab/onnx/check.py" in deps  # stages/evaluate.py -> olive_lab/evaluate.py -> olive_lab/onnx/check.py
    assert "olive_lab/__init__.py" in deps and "stages/__init__.py" in deps
    assert "olive_lab/data.py" not in deps  # the validator: editing it must not re-run evaluate


def test_no_entry_point_is_imported_as_a_library():
    """chat/, bench/, tools/ and olive_lab/ never import stages/ (entry points), tests/ or patch sys.path."""
    offenders = []
    for folder in ("chat", "bench", "tools", "olive_lab"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            mods = imported_modules(path)
            if any(m == "stages" or m.startswith(("stages.", "tests")) for m in mods) or "sys.path.insert" in text:
                offenders.append(path.relative_to(ROOT).as_posix())
    assert not offenders, f"these import stages/ or tests/, or patch sys.path: {offenders}"
