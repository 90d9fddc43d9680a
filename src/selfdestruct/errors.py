"""Errors the user can fix: entry points print them as one line, without a traceback."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """Bad input: a config key, a path or a data file. The message names which."""


class FieldError(UserError):
    """A bad value of one field of a config dataclass; :func:`selfdestruct.cli_common.to_dataclass` prefixes the
    field with its config group (``lr`` becomes ``attack.lr``)."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        super().__init__(f"{field}={value!r}: {expected}")
        self.field, self.value, self.expected = field, value, expected

    def under(self, group: str) -> UserError:
        return UserError(f"{group}.{self.field}={self.value!r}: {self.expected}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_number(obj: Any, field: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 optional: bool = False) -> None:
    """``obj.field`` is a finite number (an integer with ``integer``) within [low, high] (an open end with
    ``low_open`` / ``high_open``); None passes when ``optional``. Raises :class:`FieldError` naming the field and
    the range."""
    value = getattr(obj, field)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "") + (" or null" if optional else "")
    if not _is_number(value) or (integer and not float(value).is_integer()) or not math.isfinite(float(value)):
        raise FieldError(field, value, f"expected {expected}")
    if low is not None and (value <= low if low_open else value < low):
        raise FieldError(field, value, f"expected {expected}")
    if high is not None and (value >= high if high_open else value > high):
        raise FieldError(field, value, f"expected {expected}")


def check_choice(obj: Any, field: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    value = getattr(obj, field)
    if value not in choices:
        raise FieldError(field, value, f"expected one of {', '.join(choices)}")


def build_config(cls, values: dict[str, Any], key: str):
    """``cls(**values)`` for a config dataclass; an unknown field or a bad value is a :class:`UserError` naming
    ``key.field`` (nothing is ignored)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"{key}.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{key}.{missing[0]} is required (missing from the config)")
    try:
        return cls(**values)
    except FieldError as err:
        raise err.under(key) from None
