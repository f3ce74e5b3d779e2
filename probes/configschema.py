"""Every schema problem of a config document at once, each at the offending key's own path.

``msgspec.convert`` stops at the first problem and names an unknown key by its parent
(``$.targets[0]`` for a misspelt ``$.targets[0].targts``). This walk goes over the YAML data
beside the config structs' type annotations and reports every unknown key at its own path (with
the nearest known key as a hint), every missing required key, and every value of the wrong type;
on the way it turns duration strings (:mod:`probes.duration`) into seconds. The loader runs it
only when the data does not convert as it is (a duration string does not): a well-formed config
of numbers is converted by msgspec alone, at its speed.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Union

import msgspec

from probes.duration import is_duration, parse_duration

__all__ = ["SchemaProblem", "prepare"]

SchemaProblem = tuple[str, str]  # (field path, message)


def prepare(data: Any, annotation: Any, path: str = "$") -> tuple[Any, list[SchemaProblem]]:
    """``data`` with duration strings turned into seconds, and every schema problem found."""
    problems: list[SchemaProblem] = []
    return _walk(data, annotation, path, problems), problems


def _walk(data: Any, annotation: Any, path: str, problems: list[SchemaProblem]) -> Any:
    base, metas = _split(annotation)
    if isinstance(data, str) and any(is_duration(m) for m in metas):
        try:
            data = parse_duration(data)
        except ValueError as exc:
            problems.append((path, str(exc)))
            return data
    if _is_struct(base):
        return _walk_struct(data, base, path, problems) if isinstance(data, dict) else (
            _leaf(data, annotation, path, problems))
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is list and isinstance(data, list):
        return [_walk(item, args[0], f"{path}[{i}]", problems) for i, item in enumerate(data)]
    if origin is dict and isinstance(data, dict):
        return {key: _walk(value, args[1], f"{path}.{key}", problems)
                for key, value in data.items()}
    if origin in (Union, types.UnionType):
        member = _only_member(args, data)
        if member is not None:
            return _walk(data, member, path, problems)
    return _leaf(data, annotation, path, problems)


def _walk_struct(data: dict[str, Any], cls: type[msgspec.Struct], path: str,
                 problems: list[SchemaProblem]) -> dict[str, Any]:
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else ""
            problems.append((f"{path}.{key}", f"unknown key `{key}`{hint}"))
            continue
        out[key] = _walk(value, fields[key], f"{path}.{key}", problems)
    for field in msgspec.structs.fields(cls):
        if field.required and field.encode_name not in data:
            problems.append((f"{path}.{field.encode_name}", "required key missing"))
    return out


def _leaf(data: Any, annotation: Any, path: str, problems: list[SchemaProblem]) -> Any:
    try:
        msgspec.convert(data, annotation, strict=False)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        problems.append((path + where.rstrip("`"), message))
    return data


def _split(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(annotation) is Annotated:
        base, *metas = typing.get_args(annotation)
        return base, tuple(metas)
    return annotation, ()


def _is_struct(base: Any) -> bool:
    return isinstance(base, type) and issubclass(base, msgspec.Struct)


def _fields(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.encode_name: f.type for f in msgspec.structs.fields(cls)}


def _only_member(args: tuple[Any, ...], data: Any) -> Any:
    """The one member of a union ``data`` can be walked into (``X | None`` with data not
    None), or None when it is a plain leaf."""
    members = [a for a in args if a is not type(None)]
    if data is None or len(members) != 1:
        return None
    return members[0]
