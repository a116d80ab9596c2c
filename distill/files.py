"""Atomic file output and small, safe readers shared by every stage.

Every output is written to a temporary name in the same folder and renamed into place, so a killed
run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from distill.errors import DistillError


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um


_UMASK = _umask()


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
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
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


def _json_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` when it is a file; else a :class:`DistillError` saying it is a folder or missing."""
    path = Path(path)
    if path.is_dir():
        raise DistillError(f"{path}: is a folder (expected a {what} json)")
    if not path.is_file():
        raise DistillError(f"{path}: file not found (expected a {what} file)")
    return path


def read_json(path: str | os.PathLike, what: str = "json") -> Any:
    """Read a json file; a missing or corrupt file is a :class:`DistillError` naming it."""
    path = _json_file(path, what)
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DistillError(f"{path}: not valid json ({e}); expected a {what} file") from None


class JsonStream:
    """Read one json file value by value, in chunks, so that the file and its big lists are never
    held whole. Use as a context manager; walk the top level with :meth:`items` (a list),
    :meth:`members` (an object) and :meth:`value` (any one value, parsed whole), then :meth:`end`.
    Malformed json raises :class:`DistillError` ("not valid json", with the character offset)."""

    _WS = re.compile(r"[ \t\n\r]*")

    def __init__(self, path: str | os.PathLike, what: str = "json", chunk_chars: int = 1 << 18) -> None:
        self.path, self.what, self._chunk = Path(path), what, chunk_chars
        self._dec = json.JSONDecoder()
        self._buf, self._pos, self._base, self._eof = "", 0, 0, False
        self._f = None

    def __enter__(self) -> "JsonStream":
        self._f = open(self.path, encoding="utf-8-sig")
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def _bad(self, msg: str, pos: int | None = None) -> DistillError:
        pos = self._base + self._pos if pos is None else pos
        return DistillError(f"{self.path}: not valid json ({msg}: char {pos}); expected a {self.what} file")

    def _fill(self, grow: bool = False) -> None:
        if grow:
            self._chunk *= 2  # one value longer than the whole buffer: read more at once
        try:
            more = self._f.read(self._chunk)
        except UnicodeDecodeError as e:
            raise DistillError(f"{self.path}: not valid json ({e}); expected a {self.what} file") from None
        self._eof = not more
        self._buf, self._base, self._pos = self._buf[self._pos :] + more, self._base + self._pos, 0

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file)."""
        while True:
            self._pos = self._WS.match(self._buf, self._pos).end()
            if self._pos < len(self._buf) or self._eof:
                return self._buf[self._pos : self._pos + 1]
            self._fill()

    def _expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self._bad(f"expected {' or '.join(repr(x) for x in chars)}")
        self._pos += 1
        return c

    def value(self) -> Any:
        """The next value, parsed whole."""
        self.peek()
        while True:
            try:
                item, end = self._dec.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as e:
                if self._eof:
                    raise self._bad(e.msg, self._base + e.pos) from None
                self._fill(grow=self._pos == 0)
                continue
            if end == len(self._buf) and not self._eof:  # a number may go on in the next chunk
                self._fill(grow=self._pos == 0)
                continue
            self._pos = end
            return item

    def items(self) -> Iterator[Any]:
        """The values of the list that comes next, one at a time."""
        self._expect("[")
        if self.peek() == "]":
            self._pos += 1
            return
        while True:
            yield self.value()
            if self._expect(",]") == "]":
                return

    def members(self) -> Iterator[str]:
        """The keys of the object that comes next; after each key, read its value (:meth:`value`
        or :meth:`items`, to the end) before asking for the next key."""
        self._expect("{")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self._bad("expected a key")
            key = self.value()
            self._expect(":")
            yield key
            if self._expect(",}") == "}":
                return

    def end(self) -> None:
        """Nothing but blanks may follow the top-level value."""
        if self.peek():
            raise self._bad("extra data")


class JsonListItems:
    """The items of a json file whose top-level value is a list, parsed one at a time: the file
    is read in chunks and never held whole (see :func:`read_json_items`). Iterate once."""

    def __init__(self, path: Path, what: str, chunk_chars: int = 1 << 18) -> None:
        self.path, self.what, self.chunk = path, what, chunk_chars

    def __iter__(self) -> Iterator[Any]:
        with JsonStream(self.path, self.what, self.chunk) as js:
            yield from js.items()
            js.end()


def read_json_items(path: str | os.PathLike, what: str = "json") -> Any:
    """Like :func:`read_json`, but a file whose top-level value is a list comes back as a
    :class:`JsonListItems` (its items parsed one at a time while iterating, so the memory does
    not grow with the file); any other value is read whole."""
    path = _json_file(path, what)
    try:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip(" \t\n\r")
            while not head:
                more = f.read(4096)
                if not more:
                    break
                head = more.lstrip(" \t\n\r")
    except UnicodeDecodeError:
        head = ""
    if head.startswith("["):
        return JsonListItems(path, what)
    return read_json(path, what)


def output_is_current(output: str | os.PathLike, manifest: str | os.PathLike, inputs: Any) -> bool:
    """True when ``output`` exists and ``manifest`` (json) records exactly these ``inputs`` under
    ``"inputs"``: a rerun may reuse the output. A missing or unreadable manifest is False."""
    output, manifest = Path(output), Path(manifest)
    if not (output.is_file() and manifest.is_file()):
        return False
    try:
        return json.loads(manifest.read_text()).get("inputs") == inputs
    except (json.JSONDecodeError, AttributeError, OSError):
        return False


def is_output_of(value: str | os.PathLike, output: str | os.PathLike) -> bool:
    """True when a config value names the file a stage writes (``output``), not another one or
    none: the pipeline then runs that stage first and keys downstream stages on its digest."""
    return bool(value) and Path(value).resolve() == Path(output).resolve()


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


# ------------------------------------------------------------------------------- word lists
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"  # the prompt files shipped with distill


def shipped_prompt_files() -> list[str]:
    return sorted(p.name for p in PROMPTS_DIR.glob("*.txt"))


def find_text_file(value: str | os.PathLike, key: str, expected: str) -> Path:
    """The file a config value names: a path (relative to the working directory), else, for a
    bare name, one of the prompt files shipped with distill (``distill/prompts/``), so the
    bundled configs mean the same from any folder. One-line error naming ``key`` otherwise."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    shipped = PROMPTS_DIR / p.name
    if len(p.parts) == 1 and shipped.is_file():
        return shipped
    if p.exists():
        raise DistillError(f"{key}: {value}: not a file (expected {expected})")
    raise DistillError(f"{key}: {value}: file not found (expected {expected}; shipped with distill: {', '.join(shipped_prompt_files())})")


def read_lines(value: str | os.PathLike, key: str, expected: str = "one entry a line") -> tuple[str, ...]:
    """The entries of a word-list setting (prompt templates, background words): a value holding a
    newline is the list itself, anything else names a file (:func:`find_text_file`). One entry a
    line; blank lines and lines starting with ``#`` are skipped; a UTF-8 BOM is dropped."""
    text = str(value)
    if "\n" not in text:
        path = find_text_file(text, key, expected)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DistillError(f"{key}: {value}: not UTF-8 text (expected {expected})") from None
    lines = (ln.strip() for ln in text.splitlines())
    return tuple(ln for ln in lines if ln and not ln.startswith("#"))


def read_word_items(items, key: str, expected: str = "one entry a line") -> tuple[str, ...]:
    """A list setting whose items are entries, or ``.txt`` files of entries (:func:`read_lines`)."""
    out: list[str] = []
    for s in (str(s).strip() for s in items if s and str(s).strip()):
        out.extend(read_lines(s, key, expected) if s.lower().endswith(".txt") else [s])
    return tuple(out)


def as_lines_value(entries) -> str:
    """The config value that holds ``entries`` themselves (see :func:`read_lines`)."""
    return "".join(f"{e}\n" for e in entries)
