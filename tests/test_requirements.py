"""requirements.in names exactly what the code imports directly, plus pins that say why they are there."""

from __future__ import annotations

import re
import sys
from importlib.metadata import packages_distributions

from tests.helpers import ROOT
from tools.code_deps import imported_modules

CODE = ("olive_lab", "stages", "tools", "chat", "bench", "tests", "data")
OURS = {"olive_lab", "stages", "tools", "chat", "bench", "tests", "conftest"}
BUILT_BY_MAKE = {"llama_cpp": "make bench-setup"}  # optional, too slow to build in setup


def declared() -> dict[str, str]:
    """Normalized distribution name -> its comment, for every requirement line."""
    out = {}
    for line in (ROOT / "requirements.in").read_text().splitlines():
        spec, _, comment = line.partition("#")
        if spec.strip():
            name = re.split(r"[=<>!~\[ ]", spec.strip(), maxsplit=1)[0]
            out[normalize(name)] = comment.strip()
    return out


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> set[str]:
    top = set()
    for folder in CODE:
        for path in (ROOT / folder).rglob("*.py"):
            top |= {m.split(".")[0] for m in imported_modules(path)}
    return {m for m in top if m and m not in OURS and m not in sys.stdlib_module_names and m != "__future__"}


def test_every_direct_import_is_declared():
    providers = packages_distributions()
    reqs = declared()
    missing = {}
    for module in sorted(third_party_imports()):
        if module in BUILT_BY_MAKE:
            continue
        dists = {normalize(d) for d in providers.get(module, [])}
        if not dists & set(reqs):
            missing[module] = sorted(dists) or ["(not installed)"]
    assert not missing, f"imported but not in requirements.in: {missing}"


def test_every_requirement_is_imported_or_says_why_it_is_there():
    providers = packages_distributions()
    imported = {normalize(d) for m in third_party_imports() for d in providers.get(m, [])}
    unexplained = [name for name, why in declared().items() if name not in imported and not why]
    assert not unexplained, f"in requirements.in but never imported, with no reason given: {unexplained}"
    stale = [n for n, why in declared().items() if n in imported and why.startswith("not imported")]
    assert not stale, f"marked 'not imported' but imported: {stale}"
