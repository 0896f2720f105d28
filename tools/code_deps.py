"""Each DVC stage's code deps, derived from what its entry point imports (`ast`, transitively inside the repo).

    python -m tools.code_deps            # print the stages whose dvc.yaml code deps differ, exit 1 if any
    python -m tools.code_deps --write    # rewrite those deps in dvc.yaml (make deps)

Importing `a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so those count too. tests/test_dvc_graph.py
fails when dvc.yaml and the imports disagree.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import yaml

from olive_lab.cli import entry_point
from olive_lab.errors import StageError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("olive_lab", "stages")  # what the stages may import from this repository
# Non-Python sources a package compiles when it runs (olive_lab/kernels: the custom-op library): importing the package
# makes them code deps too
COMPILED = (".cc", ".cu", ".h")
CODE = (".py", *COMPILED)


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The repo file behind a dotted module name, or None when it is not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names of everything `path` imports (in functions too), with each package on the way."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                parent = parts[: len(parts) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def code_deps(entry: Path, root: Path = ROOT) -> set[str]:
    """Repo files `entry` runs: itself, its package's __init__, and everything it imports, transitively."""
    todo, seen = [entry], set()
    if (entry.parent / "__init__.py").is_file():
        todo.append(entry.parent / "__init__.py")
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for m in imported_modules(path, root) if (f := module_file(m, root)) is not None]
    compiled = {f for p in seen if p.name == "__init__.py" for f in p.parent.iterdir() if f.suffix in COMPILED}
    return {p.relative_to(root).as_posix() for p in seen | compiled}


def stage_entry(cmd: str, root: Path = ROOT) -> Path:
    words = cmd.split()
    entry = module_file(words[2], root) if words[:2] == ["python", "-m"] and len(words) > 2 else None
    if entry is None:
        raise StageError(f"dvc.yaml: stage command {cmd!r} is not `python -m <module of this repo>`")
    return entry


def differences(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (deps to add, deps to remove)} for every stage whose code deps disagree with its imports."""
    out = {}
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        stage = stage.get("do", stage)  # foreach stages
        declared = {d for d in stage.get("deps", []) if d.endswith(CODE)}
        expected = code_deps(stage_entry(stage["cmd"], root), root)
        if declared != expected:
            out[name] = (sorted(expected - declared), sorted(declared - expected))
    return out


def rewrite(root: Path = ROOT) -> list[str]:
    """Replace each stage's .py deps in dvc.yaml by the derived ones (other lines, comments and order kept)."""
    lines = (root / "dvc.yaml").read_text().splitlines(keepends=True)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    changed, out, stage, in_deps = [], [], None, False
    for line in lines:
        if m := re.match(r"^  (\w[\w-]*):\s*$", line):
            stage = m[1]
        if re.match(r"^\s+deps:\s*$", line):
            in_deps = True
            out.append(line)
            indent = " " * (len(line) - len(line.lstrip()))
            spec = stages[stage].get("do", stages[stage])
            for dep in sorted(code_deps(stage_entry(spec["cmd"], root), root)):
                out.append(f"{indent}  - {dep}\n")
            continue
        if in_deps and re.match(r"^\s+- \S+\s*$", line) and line.strip().endswith(CODE):
            continue  # an old code dep: replaced above
        if in_deps and not re.match(r"^\s+- ", line):
            in_deps = False
        out.append(line)
    text = "".join(out)
    if text != "".join(lines):
        (root / "dvc.yaml").write_text(text)
        changed = sorted(differences(root)) or ["dvc.yaml"]
    return changed


@entry_point
def run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.code_deps", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps")
    args = parser.parse_args(argv)
    if args.write:
        rewrite()
        print("dvc.yaml: code deps match the imports")
        return
    diff = differences()
    for name, (add, remove) in diff.items():
        print(f"{name}: add {add}, remove {remove}")
    if diff:
        raise StageError(
            f"dvc.yaml: code deps of {sorted(diff)} differ from the imports (python -m tools.code_deps --write)"
        )


if __name__ == "__main__":
    run()
