"""Reading a config: YAML (safe) files with one ``defaults:`` parent, ``key.sub=value`` overrides,
typed coercion, ``{work_dir}`` expansion and the word-list keys read into their contents."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from distill.config.sections import Config
from distill.errors import DistillError


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _valid_keys_msg(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"valid keys: {', '.join(sorted(valid))}{hint}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML / override value into ``tp``; raise DistillError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed)
            raise DistillError(f"{where}: {value!r} is not one of {shown}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DistillError(f"{where}: expected a mapping of {tp.__name__} keys, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise DistillError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise DistillError(f"{where}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise DistillError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise DistillError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise DistillError(f"{where}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise DistillError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise DistillError(f"{where}: expected a string, got {type(value).__name__}")
        return "" if value is None else str(value)
    return value


def _build(cls: type, values: dict, where: str = "") -> Any:
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise DistillError(f"unknown config key {name!r}; {_valid_keys_msg(str(key), list(fields))}")
        kwargs[key] = _coerce(value, hints[key], name)
    # Nested sections not mentioned still get their defaults from default_factory.
    return cls(**kwargs)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if path.is_dir():
        raise DistillError(f"{path}: is a folder (expected a YAML config file)")
    if not path.is_file():
        raise DistillError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a checkpoint, an image, a Latin-1 file ...
        raise DistillError(f"{path}: not UTF-8 text (expected a YAML config)") from None
    except OSError as e:
        raise DistillError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = str(e).replace("\n", " ")
        raise DistillError(f"{path}: not valid YAML (safe loader; python tags are refused): {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistillError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    parents = data.pop("defaults", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not (isinstance(parents, list) and parents and all(isinstance(p, str) for p in parents)):
        raise DistillError(f"{path}: 'defaults' must name a file or a list of files, got {parents!r}")
    merged: dict = {}
    for parent in parents:  # in order, each on top of the ones before, this file on top of all
        ppath = (path.parent / parent).resolve()
        if ppath in chain or ppath == path.resolve():
            raise DistillError(f"{path}: 'defaults' cycle through {ppath}")
        merged = _deep_merge(merged, _read_yaml(ppath, chain + (path.resolve(),)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'det.train.lr=0.01'`` -> (['det', 'train', 'lr'], 0.01 parsed as YAML scalar/list)."""
    if "=" not in text:
        raise DistillError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise DistillError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        nxt = d.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            d[k] = nxt
        d = nxt
    d[keys[-1]] = value


def _expand(obj: Any, work_dir: str) -> Any:
    if dataclasses.is_dataclass(obj):
        changes = {f.name: _expand(getattr(obj, f.name), work_dir) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, str):
        return obj.replace("{work_dir}", work_dir)
    if isinstance(obj, tuple):
        return tuple(_expand(v, work_dir) for v in obj)
    return obj


# Keys and choices renamed to the words of docs/architecture.md (the CLIPSelf tower is the
# "dense tower" everywhere). A config that uses an old name gets a one-line error naming the new
# one; a stored config (a checkpoint's, a finished run's config.yaml) is read under the new names.
RENAMED_KEYS = {"teacher.dense_pretrained": "teacher.dense_tower"}
RENAMED_VALUES = {("seg.backbone", "teacher_dense"): "dense_tower", ("cam.tower", "dense"): "dense_tower"}


def _renamed(values: dict, where: str, stored: bool) -> dict:
    """``values`` under the new names (``stored``), or a :class:`DistillError` at the first old one."""
    out = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if name in RENAMED_KEYS:
            new = RENAMED_KEYS[name]
            if not stored:
                raise DistillError(f"config key {name!r} was renamed: use {new!r}")
            name, key = new, new.rsplit(".", 1)[-1]
        if isinstance(value, dict):
            value = _renamed(value, name, stored)
        elif isinstance(value, str) and (name, value) in RENAMED_VALUES:
            new = RENAMED_VALUES[(name, value)]
            if not stored:
                raise DistillError(f"{name}: {value!r} was renamed: use {name}={new}")
            value = new
        out[key] = value
    return out


def config_from_dict(values: dict, cls: type = Config, stored: bool = False) -> Any:
    """The config of ``values`` (nested dicts as YAML gives them); ``stored``: a config written
    by an earlier distill, whose old key names (:data:`RENAMED_KEYS`) are read as the new ones."""
    cfg = _build(cls, _renamed(values, "", stored) if cls is Config else values)
    if hasattr(cfg, "work_dir"):
        cfg = _expand(cfg, cfg.work_dir)
    if cls is Config:
        cfg = _read_word_lists(cfg)
    return cfg


TEMPLATES_EXPECTED = "prompt templates, one a line, each with {} for the class name (and optionally {article} for a / an)"
# the fields a template may hold: {} = the class name; {article} = "a" / "an" before it (ViLD's
# prompt set, distill/prompts/vild.txt; filled by distill.teacher.text.fill_template)
TEMPLATE_FIELDS = ("", "article")
WORDS_EXPECTED = "background words, one a line"


def read_templates_value(value: str, key: str) -> str:
    """A templates setting as the templates themselves (one a line): a value with ``{}`` or a
    newline is the templates, anything else names a file (``distill.files.read_lines``)."""
    from distill.files import as_lines_value, read_lines

    if not value:
        return ""
    if value.strip().endswith(".safetensors") and "\n" not in value.strip():
        # a learned prompt file (`distill train prompts`, DetPro): kept as its absolute path
        path = Path(value.strip()).expanduser()
        if not path.is_file():
            raise DistillError(f"{key}: {value.strip()}: prompt file not found (expected a file written by `distill train prompts`, or templates)")
        return str(path.resolve())
    lines = tuple(ln.strip() for ln in value.splitlines() if ln.strip() and not ln.strip().startswith("#")) if "{}" in value else read_lines(value, key, TEMPLATES_EXPECTED)
    if not lines:
        raise DistillError(f"{key}: {value.strip()}: no prompt templates (expected {TEMPLATES_EXPECTED})")
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise DistillError(f"{key}: template {bad[0]!r} must contain exactly one '{{}}' for the class name")
    for t in lines:
        fields = _template_fields(t, key)
        if any(f not in TEMPLATE_FIELDS for f in fields):
            other = next(f for f in fields if f not in TEMPLATE_FIELDS)
            raise DistillError(f"{key}: template {t!r}: unknown field {{{other}}} (expected {{}} for the class name and optionally {{article}})")
    return as_lines_value(lines)


def _template_fields(template: str, key: str) -> list[str]:
    """The replacement-field names of ``template`` ("" for ``{}``), as ``str.format`` reads them."""
    import string

    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        raise DistillError(f"{key}: template {template!r}: unbalanced braces (expected {{}} for the class name and optionally {{article}})") from None


def _read_word_lists(cfg: "Config") -> "Config":
    """Settings that name word-list files (templates, background words) hold the words
    themselves from here on: read once, relative to the working directory or among the prompt
    files shipped with distill, so a saved config.yaml (beside a run, in a checkpoint) means the
    same anywhere and the stage keys follow the words, not a path."""
    from distill.files import as_lines_value, read_lines, read_word_items

    def words(value: str, key: str) -> str:
        return as_lines_value(read_lines(value, key, WORDS_EXPECTED)) if value else ""

    return dataclasses.replace(
        cfg,
        teacher=dataclasses.replace(cfg.teacher, templates=read_templates_value(cfg.teacher.templates, "teacher.templates"),
                                    background=words(cfg.teacher.background, "teacher.background")),
        cam=dataclasses.replace(cfg.cam, templates=read_templates_value(cfg.cam.templates, "cam.templates"),
                                background=words(cfg.cam.background, "cam.background")),
        label=dataclasses.replace(cfg.label, background=read_word_items(cfg.label.background, "label.background", WORDS_EXPECTED)),
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = Config,
                stored: bool = False) -> Any:
    """Load ``path`` (or pure defaults if None), apply ``key.sub=value`` overrides, validate;
    ``stored``: see :func:`config_from_dict`."""
    data = _read_yaml(Path(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    return config_from_dict(data, cls, stored)


def to_dict(cfg: Any) -> dict:
    """A plain dict (lists for tuples) that ``config_from_dict`` turns back into ``cfg``."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Save the resolved config next to an output (atomically)."""
    from distill.files import write_text

    write_text(path, dump_config(cfg))


def config_hash(section: Any) -> str:
    from distill.files import sha256_json

    return sha256_json(to_dict(section))[:16]
