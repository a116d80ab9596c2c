"""Atomic file output and small, safe readers shared by every stage.

Every output is written to a temporary name in the same folder and renamed into place, so a killed
run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from distill.errors import DistillError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    >>> with atomic_path("out.json") as tmp:
    ...     tmp.write_text("{}")
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DistillError(f"{path.parent}: cannot create output folder ({e.strerror})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    except OSError as e:
        raise DistillError(f"{path.parent}: cannot write here ({e.strerror})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DistillError(f"{path}: write failed ({e.strerror})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "json") -> Any:
    """Read a json file; a missing or corrupt file is a :class:`DistillError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DistillError(f"{path}: file not found (expected a {what} file)")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{path}: not valid json ({e}); expected a {what} file") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """Join ``name`` (taken from an input file) under ``root``; refuse names that escape it."""
    root = Path(root).resolve()
    if os.path.isabs(name):
        raise DistillError(f"{name!r}: absolute paths are not allowed here (expected a path relative to {root})")
    p = (root / name).resolve()
    if p != root and root not in p.parents:
        raise DistillError(f"{name!r}: path escapes {root} (expected a path inside it)")
    return p
