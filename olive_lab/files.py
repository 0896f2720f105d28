"""Files the stages read and write: atomic outputs, JSON and JSONL, sizes on disk."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from olive_lab.errors import StageError


@contextlib.contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield a scratch folder that replaces `dest` only if the block finishes: no half-written outputs."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    tmp.rename(dest)


def write_json(path: Path | str, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def read_metrics(path: Path | str) -> dict[str, Any]:
    """An upstream stage's metrics JSON, or {} when that stage has not written it (callers then measure themselves)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a JSONL file the pipeline wrote (data/split); a missing file says which stage makes it."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: not found (run `dvc repro data` first)")
    return [json.loads(line) for line in read_text_lines(path) if line.strip()]


def prompt_response_rows(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """The rows of a hand-written `{"prompt": ..., "response": ...}` JSONL file, with "file:line" and the line number
    for messages; blank lines are skipped. A line that is not one JSON object with exactly those two keys raises
    StageError('file:line: reason'); the callers check the values (data limits, the trip JSON schema, duplicates)."""
    for lineno, line in enumerate(read_text_lines(path), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict) or set(row) != {"prompt", "response"}:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise StageError(f"{where}: a row must have exactly the keys 'prompt' and 'response', got {keys}")
        yield where, lineno, row


def read_text_lines(path: Path | str) -> list[str]:
    """The lines of a UTF-8 text file; a byte that is not UTF-8 fails as `file:line: ...`, like any bad row."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise StageError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); save the file as UTF-8"
        ) from None


def write_jsonl(path: Path | str, rows: list[dict]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_csv(path: Path | str, header: tuple[str, ...], rows) -> None:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def dir_size_mb(path: Path | str) -> float:
    """Size on disk of a file, or of every file under a folder, in MB."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    return round(total / 1e6, 2)


def remove_outputs(*paths: Path | str) -> None:
    """Delete outputs so a failed run leaves nothing for DVC to cache."""
    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
