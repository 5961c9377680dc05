"""Generic checks of config values: each problem is a :class:`VesuviusError` naming the dotted key.

A leaf module (it imports only :mod:`vesuvius_monai.errors`; MONAI only to word a did-you-mean message), so that
any module may validate its inputs the way the config does without importing the config.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

from vesuvius_monai.errors import VesuviusError, did_you_mean


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``VesuviusError("config key '<key>': <message>")`` unless ``ok``."""
    if not ok:
        raise VesuviusError(f"config key '{key}': {message}")


def choice(key: str, value: Any, options: typing.Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``; else MONAI's ``look_up_option`` error (with did-you-mean) for ``key``.

    ``True`` never passes for ``1`` (nor ``3.0`` for ``3``): the value must have the options' own type.
    """
    if any(type(value) is type(option) and value == option for option in options):
        return value
    require(value not in options, key, f"must be one of {', '.join(map(repr, options))}, got {value!r} "
                                       f"(a {type(value).__name__})")
    from monai.utils import look_up_option  # only for its message: it names the closest option

    try:
        look_up_option(value, options)
    except ValueError as err:
        raise VesuviusError(f"config key '{key}': {' '.join(str(err).split())}") from None
    raise AssertionError(f"look_up_option accepted {value!r}, which is not among {options}")


def finite(key: str, value: float, low: float | None = None, high: float | None = None, *,
           open_low: bool = False) -> None:
    """Raise unless ``value`` is finite and within [low, high] (``(low, high]`` with ``open_low``)."""
    ok = math.isfinite(value) and (high is None or value <= high)
    if low is not None:
        ok = ok and (value > low if open_low else value >= low)
    bounds = [f"{'>' if open_low else '>='} {low}"] if low is not None else []
    bounds += [f"<= {high}"] if high is not None else []
    require(ok, key, " ".join(["must be a finite number", " and ".join(bounds)]).rstrip() + f", got {value!r}")


def integer(key: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int if it is an integer (a NumPy one too, never a bool) of at least ``low``; else an error
    naming ``key``."""
    require(isinstance(value, numbers.Integral) and not isinstance(value, bool), key,
            f"must be an integer, got {value!r}")
    require(low is None or value >= low, key, f"must be >= {low}, got {value}")
    return int(value)


def check_fields(obj: Any, prefix: str) -> None:
    """Check every field of dataclass ``obj`` against its type hint and store the coerced value.

    Lists become tuples where the hint says tuple, ints become floats where it says float; a wrong type
    raises a VesuviusError naming ``prefix.field``. Works on frozen dataclasses too.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = coerce(getattr(obj, f.name), hints[f.name], f"{prefix}.{f.name}")
        object.__setattr__(obj, f.name, value)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, X | None, tuple[...], list[X], dict, a section)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, key)
    if hint is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        return integer(key, value)
    if hint is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], key) for v in value)
        require(len(value) == len(args), key, f"must have {len(args)} values, got {list(value)}")
        return tuple(coerce(v, a, key) for v, a in zip(value, args))
    if origin is list or hint is list:
        require(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        args = typing.get_args(hint)
        return [coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys (values are checked by ``cls``)."""
    where = prefix or "top level"
    if data is None:
        data = {}
    require(isinstance(data, dict), where, f"must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise VesuviusError(f"unknown config key '{full}'{did_you_mean(str(key), names)} "
                                f"(known in {where}: {', '.join(names)})")
    hints = typing.get_type_hints(cls)
    kwargs = {key: coerce(value, hints[key], f"{prefix}.{key}" if prefix else str(key)) for key, value in data.items()}
    return cls(**kwargs)
