"""Dataclasses built from data we did not write, each value checked against its type hint.

Two kinds of such data reach the server: settings, from a TOML file a person
edited or from the command line (``config.py``), and queue envelopes, from
JSON files on disk that a crash may have cut short or a person may have
edited (``outqueue.py``). Both are checked once, where they come in: a value
of the wrong type that got through would fail much later, far from its cause,
in a listener or a delivery thread.

``build(cls, values)`` understands the hints these dataclasses use: ``str``,
``int``, ``float``, ``bool``, ``Path``, ``X | None``, ``Literal[...]``,
``tuple[X, ...]``, ``list[X]``, enums and nested dataclasses. A field may
also carry a ``check`` in its metadata, a function that raises ValueError
for a value of the right type that is still wrong (a port of 0, say).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

UNKNOWN_FIELD = "unknown field"
MISSING_FIELD = "missing field"


class SchemaError(ValueError):
    """A value that does not fit: ``key`` says where (``smtp.port``,
    ``recipients[0].state``), ``problem`` what is wrong (or UNKNOWN_FIELD, MISSING_FIELD)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{problem} {key}" if problem in (UNKNOWN_FIELD, MISSING_FIELD) else f"{key}: {problem}")
        self.key = key
        self.problem = problem


def build(cls: type, values: object, key: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a dict; SchemaError if it does not fit.

    A field left out keeps its default, and must have one.
    """
    if not isinstance(values, dict):
        raise SchemaError(key or cls.__name__, f"expected a table of named values, got {values!r}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    prefix = f"{key}." if key else ""
    for name in values:
        if name not in fields:
            raise SchemaError(f"{prefix}{name}", UNKNOWN_FIELD)
    hints = _type_hints(cls)
    arguments = {}
    for name, field in fields.items():
        if name not in values:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{prefix}{name}", MISSING_FIELD)
            continue
        value = convert(values[name], hints[name], f"{prefix}{name}")
        check = field.metadata.get("check")
        if check is not None and value is not None:
            try:
                check(value)
            except ValueError as error:
                raise SchemaError(f"{prefix}{name}", str(error)) from None
            except OSError as error:  # a check that looks at a file: a name too long, a directory shut
                raise SchemaError(f"{prefix}{name}", f"cannot use {value}: {error.strerror or error}") from None
        arguments[name] = value
    return cls(**arguments)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving the hints evaluates their text (``from __future__ import
    # annotations``): once per class, not once per envelope read.
    return typing.get_type_hints(cls)


def convert(value: object, kind: Any, key: str) -> Any:
    """``value`` as the type hint ``kind`` says, or SchemaError naming ``key``."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            choices = ", ".join(repr(choice) for choice in typing.get_args(kind))
            raise SchemaError(key, f"{value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):  # X | None: the only unions we use
        if value is None:
            return None
        [kind] = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return convert(value, kind, key)
    if origin in (tuple, list):
        item_kind = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            raise SchemaError(key, f"expected a list, got {value!r}")
        return origin(convert(item, item_kind, f"{key}[{index}]") for index, item in enumerate(value))
    if dataclasses.is_dataclass(kind):
        return build(kind, value, key)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise SchemaError(key, f"{value!r} is not one of {', '.join(map(str, kind))}") from None
    if isinstance(value, str) and "\x00" in value:
        # TOML and JSON can hold one (\u0000), but no path, host or user
        # name can: the system calls would refuse it with a traceback.
        raise SchemaError(key, "a NUL character (\\u0000) is in no name or path")
    if kind is Path:
        if not isinstance(value, (str, Path)):
            raise SchemaError(key, f"expected a path, got {value!r}")
        if value == "":  # Path("") is the current directory: say so if that is meant
            raise SchemaError(key, "an empty path (write . for the current directory)")
        return Path(value)
    # TOML and JSON write 5 for 5.0: an int is a fine float. A bool is an int
    # to isinstance, but never what a count, a port or a time means.
    accepted = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}.get(kind)
    if accepted is None:  # a dataclass with a field of a type this module cannot read: the code's mistake
        raise TypeError(f"schema: {key} is typed {kind!r}, which convert() cannot read")
    if isinstance(value, bool) and kind is not bool or not isinstance(value, accepted):
        raise SchemaError(key, f"expected {kind.__name__}, got {value!r}")
    try:
        converted = kind(value)
    except OverflowError:  # an int with more digits than a float holds
        raise SchemaError(key, f"the number is too large for a {kind.__name__}") from None
    # JSON's NaN and Infinity (and 1e999) are floats, but no time or size:
    # a message due at NaN would never be due, nor ever expire.
    if kind is float and not math.isfinite(converted):
        raise SchemaError(key, f"expected a finite number, got {value!r}")
    return converted
