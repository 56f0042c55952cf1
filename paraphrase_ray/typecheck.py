"""Values checked against the type of the config field they go into (pydantic, strict), with clear messages.

``check_value(int, 12.7, "train.steps")`` raises "train.steps must be an integer, got 12.7"; a quoted boolean is
an error that says to drop the quotes. One leniency: numbers written the YAML 1.1 way (``3e-2``, which PyYAML
reads as a string) are numbers. ``config.from_dict`` / ``replace_nested`` call this for every value.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import re
import types
import typing
from typing import Any

from paraphrase_ray.errors import ConfigError


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation (the modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(hint: Any):
    from pydantic import TypeAdapter  # imported on first use: pydantic costs ~0.3 s

    return TypeAdapter(hint)


_YAML11_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _members(hint: Any) -> tuple[Any, ...]:  # int | None -> (int, NoneType)
    return typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)


def _as_number(hint: Any, value: Any) -> Any:
    """YAML 1.1 numbers (``3e-2``: a string to PyYAML) and numpy scalars as the plain number the field wants."""
    wants_float, wants_int = float in _members(hint), int in _members(hint)
    if not (wants_float or wants_int) or isinstance(value, bool):
        return value
    if isinstance(value, str) and _YAML11_NUMBER.fullmatch(value.strip()):
        value = float(value)
    elif isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, numbers.Real):
        value = float(value)
    if isinstance(value, float) and wants_int and not wants_float and value.is_integer():
        return int(value)  # "1e3" steps
    return value


def _describe(hint: Any) -> str:
    members = _members(hint)
    if len(members) > 1:
        return " or ".join("null" if m is type(None) else _describe(m) for m in members)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values" if args else "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} keys"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(hint: Any, value: Any, key: str) -> Any:
    """``value`` checked against type ``hint`` (strict, except YAML 1.1 numbers); ConfigError names ``key``."""
    from pydantic import ValidationError

    if isinstance(value, list):
        value = tuple(value)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and isinstance(value, tuple) and args:
        homogeneous = len(args) == 2 and args[1] is Ellipsis  # tuple[float, ...]
        elems = [args[0] if homogeneous else args[min(i, len(args) - 1)] for i in range(len(value))]
        value = tuple(_as_number(t, v) for t, v in zip(elems, value))
    else:
        value = _as_number(hint, value)
    try:
        return _adapter(hint).validate_python(value, strict=True)
    except ValidationError:
        boolish = bool in _members(hint) and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no")
        quoted = " (a quoted string: write it without quotes)" if boolish else ""
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{key} must be {_describe(hint)}, got {shown!r}{quoted}") from None


