"""Typed reading of JSON documents into frozen dataclasses, validated once, naming the field.

A document type is a dataclass whose fields are annotated with ``int``, ``float``, ``str``,
``bool``, ``list[T]``, ``dict[str, T]``, ``T | None``, ``Literal[...]``, ``int | str`` or another
document type. Ranges and shapes of values go in the field's metadata::

    count: int = field(metadata=check(ge=0))
    file: str = field(metadata=check(filename=True))

``load(Cls, obj, source)`` returns a ``Cls`` or raises ``ManifestError`` whose one-line message
names the source, the field path (``params[3].shape[1]``), what was expected and what was found.
Booleans are never accepted as numbers and strings never as numbers ("2" is not 2).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ManifestError

__all__ = ["check", "dump", "load"]

_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def check(*, ge: float | None = None, le: float | None = None, gt: float | None = None,
          lt: float | None = None, filename: bool = False, nonempty: bool = False) -> dict:
    """Field metadata: numeric bounds, ``filename`` (a plain file name inside the bundle folder:
    no path separator, no ``..``, no leading dot), ``nonempty`` (str, list, dict)."""
    return {"check": {"ge": ge, "le": le, "gt": gt, "lt": lt, "filename": filename,
                      "nonempty": nonempty}}


def is_safe_filename(name: object) -> bool:
    """A plain file name: letters, digits, ``._-``, not starting with a dot, at most 200 chars."""
    return isinstance(name, str) and bool(_FILENAME.match(name)) and ".." not in name


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, value: Any) -> ManifestError:
        where = path or "(document)"
        return ManifestError(f"{self.source}: field '{where}': expected {expected}, got "
                             f"{_describe(value)}; re-export the bundle")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(ctx: _Ctx, tp: Any, value: Any, path: str, meta: dict | None) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ctx.fail(path, _name(tp), value)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(ctx, a, value, path, meta)
            except ManifestError as exc:
                errors.append(exc)
        if len(errors) == 1:  # X | None given a value: X's own reason names the inner field
            raise errors[0]
        raise ctx.fail(path, _name(tp), value)
    if origin is Literal:
        if value not in get_args(tp) or isinstance(value, bool):
            raise ctx.fail(path, "one of " + ", ".join(repr(a) for a in get_args(tp)), value)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ctx.fail(path, f"a list ({_name(tp)})", value)
        (item,) = get_args(tp)
        out = [_convert(ctx, item, v, f"{path}[{i}]", None) for i, v in enumerate(value)]
        _bounds(ctx, path, out, meta)
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise ctx.fail(path, f"an object ({_name(tp)})", value)
        kt, vt = get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or _CONTROL.search(k):
                raise ctx.fail(path, "string keys without control characters", k)
            out[k] = _convert(ctx, vt, v, f"{path}.{k}" if path else k, None)
        _bounds(ctx, path, out, meta)
        return out
    if dataclasses.is_dataclass(tp):
        return _load_obj(ctx, tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.fail(path, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(path, "an integer", value)
        _bounds(ctx, path, value, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                float(value)):
            raise ctx.fail(path, "a finite number", value)
        _bounds(ctx, path, float(value), meta)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.fail(path, "a string", value)
        if _CONTROL.search(value):  # a name printed in a message would split or drive it
            raise ctx.fail(path, "a string without control characters", value)
        _bounds(ctx, path, value, meta)
        return value
    if tp is Any:
        return value
    raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")  # a bug in a schema


# C0 control characters but tab, DEL and C1: a manifest string never holds them (session 28
# probe: a parameter name with a newline forged a second "error:" line)
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _bounds(ctx: _Ctx, path: str, value: Any, meta: dict | None) -> None:
    c = (meta or {}).get("check")
    if not c:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("le", lambda v, b: v <= b, "<="),
                              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<")):
            bound = c.get(key)
            if bound is not None and not ok(value, bound):
                raise ctx.fail(path, f"a number {word} {bound}", value)
    if c.get("filename") and not is_safe_filename(value):
        raise ctx.fail(path, "a plain file name inside the bundle folder (no '/', no '..', no "
                             "leading dot)", value)
    if c.get("nonempty") and hasattr(value, "__len__") and len(value) == 0:
        raise ctx.fail(path, "a non-empty value", value)


def _name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _load_obj(ctx: _Ctx, cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ctx.fail(path, f"an object ({cls.__name__})", value)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        k = unknown[0]
        raise ManifestError(f"{ctx.source}: unknown field '{path + '.' if path else ''}{k}'; "
                            f"allowed: {', '.join(fields)}; re-export the bundle")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in value:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ManifestError(f"{ctx.source}: missing field '{sub}'; re-export the bundle")
        kwargs[name] = _convert(ctx, hints[name], value[name], sub, dict(f.metadata))
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            field_name, text = problem
            raise ManifestError(f"{ctx.source}: field '{path + '.' if path else ''}{field_name}': "
                                f"{text}; re-export the bundle")
    return obj


def load(cls: type, value: Any, source: str) -> Any:
    """``value`` (parsed JSON) as a ``cls``, validated field by field.

    Raises:
        ManifestError: a missing, unknown, mistyped or out-of-range field (one line, naming it).
    """
    return _load_obj(_Ctx(source), cls, value, "")


def dump(obj: Any) -> Any:
    """A document as JSON-able data (the inverse of :func:`load`)."""
    if dataclasses.is_dataclass(obj):  # (a field marked omit_default: left out at its default,
        return {f.name: dump(getattr(obj, f.name))  # so runtimes older than it read the rest)
                for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, list | tuple):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    return obj
