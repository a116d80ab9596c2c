"""Vocabularies: class names, synonyms, and a base/novel split.

Sources (see :func:`load_vocab`):
- a ``.txt`` file (or another text file such as darknet's ``.names``), one class a line, optionally
  ``name: synonym, synonym``; ``#`` comment lines and blank lines are ignored. A file whose only
  class line holds commas (``cat, dog, bird``) is a comma-separated list instead, unless a colon
  comes before its first comma (``red star: scarlet star, ruby star`` is one class with
  synonyms). In a file of several lines a comma is part of the line's class name
  (``building, edifice``; trailing commas are dropped); synonyms are written
  ``name: synonym, synonym``;
- a ``.json`` list of names, or of ``{"name", "synonyms", "split", "id", "prompt"}`` objects
  (``prompt``: optional, the text that stands for the name in the prompt templates, verbatim, e.g.
  CLIP-ES's "person with clothes,people,human" for VOC's "person": one prompt, not averaged);
- a COCO or LVIS annotation json (its ``categories``; a per-category ``split`` field is used, and
  LVIS frequency ``r`` means novel);
- an inline string of names separated by commas and / or newlines: ``"red star, blue circle"``.
  Inline and txt entries may map a prompt onto a class: ``"crimson star=red star"`` adds
  "crimson star" as a synonym of "red star" (and makes the class if it is not listed); an entry
  holds at most one ``=``.

A value is a file when it names one, or when it looks like a path: it holds a ``/`` or ``\\`` (and
no comma), or ends in a vocabulary-like extension (:data:`VOCAB_FILE_SUFFIXES`). Such a value
that is not a file is an error ("file not found", "is a folder"), never an inline class named
after the path; a bare word stays an inline name even where a folder of that name exists (an
image-folder dataset's ``cat/``). ``.yaml`` / ``.yml`` / ``.csv`` / ``.tsv`` files are refused:
their structure (a YAML list, a table's columns) is not read, and reading their lines as names
would turn ``- cat`` or ``1,cat`` into class names.

Names from txt, inline and json-list sources are normalised: a UTF-8 byte-order mark is dropped,
unicode is NFC-normalised, runs of whitespace become one space, ends are stripped. A name given
twice is an error naming both entries, whether written the same way or two spellings that are
equal after that, ignoring case (``red star`` / ``red  star`` / ``Red Star``); so is a source with
no class at all. (Synonyms of one class go on its own line, ``name: synonym, synonym``, or as
``synonym=name`` entries; nothing is merged.) COCO / LVIS names are kept as the file spells them
(they identify the categories of that file), but compared the same way.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import DistillError
from distill.files import sha256_json

SPLITS = ("base", "novel")
# Extensions that make a --vocab value a file (not an inline class name) even where no such file
# exists; the last four are refused (their structure is not read).
VOCAB_FILE_SUFFIXES = (".txt", ".json", ".names", ".yaml", ".yml", ".csv", ".tsv")
_REFUSED_SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".csv": "CSV", ".tsv": "TSV"}
VOCAB_EXPECTED = ("a .txt (one class a line, or one comma-separated line), a .json list of names or category objects, "
                  "a COCO / LVIS json, or inline names separated by commas")


def normalize_name(text: str) -> str:
    """A class name or prompt as the user meant it: byte-order marks dropped, NFC unicode, runs of
    whitespace (tabs, newlines, no-break spaces) collapsed to one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", str(text).replace("\ufeff", "")).split())


def name_key(text: str) -> str:
    """What makes two names the same class: the normalised name, ignoring case."""
    return normalize_name(text).lower()


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes. Index ``i`` is the contiguous label of ``names[i]``.

    ``ids`` are the dataset category ids (COCO ``category_id``), ``synonyms[i]`` the extra prompts
    that name class ``i``, ``split[i]`` in ``{"base", "novel"}``. ``prompt_names[i]`` is the text
    that stands for the name in the prompts (the first prompt); it defaults to the name and
    differs only for dataset names that are identifiers rather than text (LVIS ``roller_skate``
    -> "roller skate"). Names, not prompt names, identify a class (``index``, files, metrics).
    """

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...] = ()
    split: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    source: str = field(default="", compare=False)
    prompt_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.names)
        if n == 0:
            raise DistillError(f"{self.source or 'vocabulary'}: empty vocabulary (expected at least one class)")
        if not self.synonyms:
            object.__setattr__(self, "synonyms", tuple(() for _ in range(n)))
        if not self.split:
            object.__setattr__(self, "split", tuple("base" for _ in range(n)))
        if not self.ids:
            object.__setattr__(self, "ids", tuple(range(1, n + 1)))
        if not self.prompt_names:
            object.__setattr__(self, "prompt_names", tuple(self.names))
        for what in ("synonyms", "split", "ids", "prompt_names"):
            if len(getattr(self, what)) != n:
                raise DistillError(f"{self.source or 'vocabulary'}: {what} has {len(getattr(self, what))} entries for {n} classes")
        seen: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if not isinstance(name, str) or not name.strip():
                raise DistillError(f"{self.source or 'vocabulary'}: class {i} has an empty name")
            key = name_key(name)
            if key in seen:
                j = seen[key]
                raise DistillError(f"{self.source or 'vocabulary'}: duplicate class {name!r} (class {i}) is the same as {self.names[j]!r} "
                                   f"(class {j}) once case and spaces are ignored; keep one")
            seen[key] = i
        bad = [s for s in self.split if s not in SPLITS]
        if bad:
            raise DistillError(f"{self.source or 'vocabulary'}: split {bad[0]!r} is not one of {SPLITS}")
        if len(set(self.ids)) != n:
            raise DistillError(f"{self.source or 'vocabulary'}: duplicate category ids")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def prompts(self) -> tuple[tuple[str, ...], ...]:
        """Per class: its prompt name then its synonyms (what the text encoder embeds and averages)."""
        return tuple((n,) + tuple(s for s in syn if s != n) for n, syn in zip(self.prompt_names, self.synonyms))

    @property
    def base_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == "base"]

    @property
    def novel_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.split) if s == "novel"]

    @property
    def is_novel(self) -> list[bool]:
        return [s == "novel" for s in self.split]

    def index(self, name: str) -> int:
        key = name_key(name)
        for i, (n, syn) in enumerate(zip(self.names, self.synonyms)):
            if name_key(n) == key or key in (name_key(s) for s in syn):
                return i
        shown = self.names[:20]
        listed = ", ".join(repr(n) for n in shown) if any("," in n for n in shown) else ", ".join(shown)  # names with commas: quoted
        raise DistillError(f"class {name!r} is not in the vocabulary ({listed}{' ...' if len(self) > 20 else ''})")

    def id_to_index(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.ids)}

    def subset(self, indices: list[int]) -> "Vocabulary":
        return Vocabulary(
            tuple(self.names[i] for i in indices),
            tuple(self.synonyms[i] for i in indices),
            tuple(self.split[i] for i in indices),
            tuple(self.ids[i] for i in indices),
            self.source,
            tuple(self.prompt_names[i] for i in indices),
        )

    def with_split(self, novel: list[str] | set[str]) -> "Vocabulary":
        novel_l = {name_key(n) for n in novel}
        unknown = novel_l - {name_key(n) for n in self.names}
        if unknown:
            raise DistillError(f"split: unknown classes {sorted(unknown)} (valid: {', '.join(self.names)})")
        split = tuple("novel" if name_key(n) in novel_l else "base" for n in self.names)
        return Vocabulary(self.names, self.synonyms, split, self.ids, self.source, self.prompt_names)

    def categories(self) -> list[dict]:
        """COCO ``categories`` entries, with our ``split`` field."""
        return [
            {"id": cid, "name": n, "synonyms": list(s), "split": sp, "supercategory": ""}
            for cid, n, s, sp in zip(self.ids, self.names, self.synonyms, self.split)
        ]

    def to_json(self) -> list[dict]:
        return [{"id": cid, "name": n, "synonyms": list(s), "split": sp} for cid, n, s, sp in zip(self.ids, self.names, self.synonyms, self.split)]

    @property
    def hash(self) -> str:
        """Identifies names, synonyms, prompt names and order (not the split: it does not change
        embeddings). Prompt names enter only where they differ from the names, so the hash of
        every other vocabulary is what it was before they existed."""
        extra = [self.prompt_names] if self.prompt_names != self.names else []
        return sha256_json([self.names, self.synonyms, *extra])[:16]


def _parse_entries(entries: list[tuple[str, str]], source: str) -> Vocabulary:
    """``(entry, where)`` pairs, entries like ``"red star"``, ``"red star: scarlet star, ruby star"``
    or ``"crimson star=red star"``; ``where`` says where the entry is ("line 3", "entry 2") for
    errors. Names are normalised (:func:`normalize_name`). A name given twice is an error, written
    the same way or not (case, spaces); so is an entry with more than one ``=``."""
    names: list[str] = []
    syns: dict[str, list[str]] = {}  # name_key -> synonyms
    defined: dict[str, tuple[str, str]] = {}  # name_key -> (name as first written, where)
    aliases: list[tuple[str, str]] = []
    for raw, where in entries:
        e = normalize_name(raw)
        if not e or e.startswith("#"):
            continue
        if "=" in e:
            if e.count("=") > 1:
                raise DistillError(f"{source}: {where}: entry {raw.strip()!r}: expected one 'prompt=class' (one '=', "
                                   "separate entries with commas or newlines)")
            prompt, cls = (normalize_name(p) for p in e.split("=", 1))
            if not prompt or not cls:
                raise DistillError(f"{source}: {where}: entry {raw.strip()!r}: expected 'prompt=class'")
            aliases.append((prompt, cls))
            continue
        written = raw.split(":", 1)[0] if ":" in raw else raw
        written = unicodedata.normalize("NFC", written.replace("\ufeff", "")).strip()
        if ":" in e:
            name, rest = e.split(":", 1)
            name = normalize_name(name)
            extra = [normalize_name(x) for x in rest.split(",") if normalize_name(x)]
            if not name:
                raise DistillError(f"{source}: {where}: entry {raw.strip()!r}: expected 'name: synonym, synonym'")
        else:
            name, extra = e, []
        key = name_key(name)
        if key in defined:
            first, w0 = defined[key]
            if written == first:
                raise DistillError(f"{source}: duplicate class {written!r} ({where}) is already {w0}; keep one "
                                   "(synonyms go on its line: 'name: synonym, synonym')")
            raise DistillError(f"{source}: duplicate class {written!r} ({where}) is the same as {first!r} ({w0}) "
                               "once case and spaces are ignored; keep one")
        defined[key] = (written, where)
        names.append(name)
        syns[key] = []
        for x in extra:
            if name_key(x) != key and name_key(x) not in (name_key(y) for y in syns[key]):
                syns[key].append(x)
    for prompt, cls in aliases:
        key = name_key(cls)
        if key not in syns:  # "crimson star=red star" with no separate "red star" entry: make the class
            names.append(cls)
            syns[key] = []
        if name_key(prompt) != key and name_key(prompt) not in (name_key(y) for y in syns[key]):
            syns[key].append(prompt)
    if not names:
        raise DistillError(f"{source}: empty vocabulary (no class names, only blank entries or # comments)")
    return Vocabulary(tuple(names), tuple(tuple(syns[name_key(n)]) for n in names), source=source)


def _text_entries(text: str) -> list[tuple[str, str]]:
    """A vocabulary text file's entries: one class a line, or, when the only class line holds
    commas and no colon comes before its first comma, the comma-separated names of that line.
    One class a line, commas inside a line belong to the name, except trailing ones (``cat,``:
    a list copied from code), which are dropped."""
    lines = [(ln, f"line {i}") for i, ln in enumerate(text.splitlines(), 1) if normalize_name(ln) and not normalize_name(ln).startswith("#")]
    if len(lines) == 1 and "," in lines[0][0] and ":" not in lines[0][0].split(",", 1)[0]:
        line, where = lines[0]
        return [(x, f"{where} entry {k}") for k, x in enumerate(line.split(","), 1)]
    return [(re.sub(r"[\s,]+$", "", ln), where) for ln, where in lines]


def _inline_entries(text: str) -> list[tuple[str, str]]:
    """An inline vocabulary's entries: names separated by commas and / or newlines."""
    return [(x, f"entry {k}") for k, x in enumerate(re.split(r"[,\r\n]", text), 1)]


def prompt_text(name: str) -> str:
    """A dataset category name as prompt text: underscores become spaces (LVIS ``roller_skate``,
    ``pin_(non_jewelry)`` -> "roller skate", "pin (non jewelry)"), blanks collapsed.

    This follows ViLD's ``processed_name`` (its LVIS colab and ``vild/tools``: "_ for lvis",
    ``name.replace('_', ' ')``) and Detic's ``tools/dump_clip_features.py --fix_space``. Like
    ViLD, the parenthesised qualifier is kept: it is what tells LVIS's ``bow_(weapon)`` from
    ``bow_(decorative_ribbons)``, which would otherwise get the same prompt. Hyphens stay
    (``bow-tie``), as in both. ViLD's "/" -> " or " is for Objects365 names, not LVIS; not done."""
    return " ".join(name.replace("_", " ").split())


def vocab_from_categories(cats: list, source: str) -> Vocabulary:
    """A vocabulary from COCO / LVIS ``categories`` (``split`` field, or LVIS ``frequency`` r = novel).

    Names stay as the file spells them (they identify the class); the prompts use
    :func:`prompt_text` of the name and of each synonym, or a category's own ``prompt`` text
    (whitespace normalised, commas kept: it is one prompt) in place of the name."""
    names, syns, split, ids, prompt_names = [], [], [], [], []
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or "name" not in c:
            raise DistillError(f"{source}: categories[{i}] must be an object with 'name' (and 'id')")
        names.append(str(c["name"]))
        if "prompt" in c and not (isinstance(c["prompt"], str) and normalize_name(c["prompt"])):
            raise DistillError(f"{source}: categories[{i}] ({c['name']!r}): 'prompt' must be a non-empty string, got {c['prompt']!r}")
        prompt_names.append(normalize_name(c["prompt"]) if "prompt" in c else prompt_text(str(c["name"])) or str(c["name"]))
        syn = [prompt_text(s) for s in c.get("synonyms", []) if isinstance(s, str) and prompt_text(s)]
        syns.append(tuple(dict.fromkeys(s for s in syn if s != c["name"])))
        if "split" in c:
            split.append(str(c["split"]))
        elif "frequency" in c:  # LVIS: rare = novel
            split.append("novel" if c["frequency"] == "r" else "base")
        else:
            split.append("base")
        ids.append(int(c.get("id", i + 1)))
    return Vocabulary(tuple(names), tuple(syns), tuple(split), tuple(ids), source, tuple(prompt_names))


def load_vocab(source: str | Path, split_file: str | Path | None = None) -> Vocabulary:
    """Load a vocabulary from a file (txt, json list, COCO/LVIS json) or an inline string (the
    formats are in this module's docstring)."""
    text = str(source)
    path = Path(text)
    single = "\n" not in text and "\r" not in text  # a newline never belongs to a file name: an inline list
    # a value that looks like a path names a file even where there is none (never an inline class
    # named after the path): a separator with no comma, or a vocabulary file's extension
    looks_like_path = single and (text.strip().lower().endswith(VOCAB_FILE_SUFFIXES)
                                  or ("," not in text and ("/" in text or "\\" in text)))
    try:
        is_file = single and path.is_file()
        is_dir = looks_like_path and path.is_dir()
    except (OSError, ValueError):  # e.g. an inline vocabulary longer than a file name may be
        is_file = is_dir = False
    if is_dir:
        raise DistillError(f"{path}: is a folder (expected a vocabulary file: {VOCAB_EXPECTED})")
    if looks_like_path and not is_file:
        raise DistillError(f"{path}: vocabulary file not found (a value with '/' or a file extension names a file; "
                           "inline class names are separated by commas)")
    if is_file:
        kind = _REFUSED_SUFFIXES.get(path.suffix.lower())
        if kind:
            raise DistillError(f"{path}: a {kind} vocabulary is not read (expected {VOCAB_EXPECTED}; "
                               "a file of one class a line can be renamed to .txt)")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DistillError(f"{path}: not valid json ({e}); expected a vocabulary or COCO file") from None
            if isinstance(data, dict) and "categories" in data:
                vocab = vocab_from_categories(data["categories"], str(path))
            elif isinstance(data, list) and all(isinstance(x, str) for x in data):
                vocab = _parse_entries([(x, f"entry {k}") for k, x in enumerate(data, 1)], str(path))
            elif isinstance(data, list) and all(isinstance(x, dict) for x in data):
                vocab = vocab_from_categories(data, str(path))
            else:
                raise DistillError(f"{path}: expected a list of names, a list of category objects, or a COCO file with 'categories'")
        else:
            try:
                content = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                raise DistillError(f"{path}: not UTF-8 text; expected one class a line") from None
            vocab = _parse_entries(_text_entries(content), str(path))
    else:
        vocab = _parse_entries(_inline_entries(text), "inline vocabulary")
    if split_file:
        vocab = apply_split_file(vocab, split_file)
    return vocab


def apply_split_file(vocab: Vocabulary, split_file: str | Path) -> Vocabulary:
    """A split file is a txt of novel class names, or a json ``{"novel": [...]}`` (names or ids)."""
    p = Path(split_file)
    if not p.is_file():
        raise DistillError(f"{p}: split file not found")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DistillError(f"{p}: not valid json ({e}); expected {{'novel': [names or ids]}}") from None
        if not isinstance(data, dict) or "novel" not in data:
            raise DistillError(f"{p}: expected an object with key 'novel'")
        novel = data["novel"]
    else:
        novel = [normalize_name(l) for l in p.read_text(encoding="utf-8-sig").splitlines() if normalize_name(l) and not normalize_name(l).startswith("#")]
    by_id = {cid: n for cid, n in zip(vocab.ids, vocab.names)}
    names = []
    for x in novel:
        if isinstance(x, int):
            if x not in by_id:
                raise DistillError(f"{p}: novel category id {x} is not in the vocabulary")
            names.append(by_id[x])
        else:
            names.append(str(x))
    return vocab.with_split(names)


def resolve_vocab(data, value: str = "", *, key: str = "data.vocab", need_base: bool = False) -> Vocabulary:
    """The vocabulary a stage works with: the one resolver every stage calls.

    ``data``: the config's data section (:class:`distill.config.DataConfig`); ``value``: the
    stage's own vocabulary setting (``label.vocab``, ``cam.vocab``), named ``key`` in errors.
    The first of these that applies is read (:func:`load_vocab`):

    1. ``value``, when given;
    2. ``data.vocab``, when given;
    3. the categories of ``data.train_full_json`` (every class, with its ``split``), when that
       file exists;
    4. the categories of ``data.val_json``, when that file exists.

    A given value (1, 2) is read as it is (a missing file is an error, never a fall-through).
    ``data.split_file``, when set, then gives the base/novel split. ``need_base``: a vocabulary
    without a base class is an error (the detectors train on base classes)."""
    source = value or data.vocab
    if not source:
        source = next((f for f in (data.train_full_json, data.val_json) if f and Path(f).is_file()), "")
    if not source:
        raise DistillError(f"{key}: required (a vocabulary file or an inline list such as 'red star,crimson star=red star'; "
                           "without one, the categories of data.train_full_json or data.val_json when they exist)")
    vocab = load_vocab(source, data.split_file or None)
    if need_base and not vocab.base_indices:
        raise DistillError(f"{vocab.source or 'vocabulary'}: no base classes (every class is novel; check the split)")
    return vocab
