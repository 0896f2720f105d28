"""Benchmarks: `python -m bench.<name>`; each imports olive_lab, never stages/ or tests/."""
