"""Typed, range-checked fields for the cacher config dataclasses.

Each field carries a checker in its dataclass metadata; ``parse_config`` turns a manifest table
into a frozen config and raises ``SettingsError`` (key relative to the table) on the first bad
value, so the manifest layer can prefix it with ``runtime.cacher``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ..errors import SettingsError, did_you_mean

Checker = Callable[[str, Any], Any]


def int_field(default: int, lo: int, hi: int | None = None, doc: str = "") -> Any:
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def check(key: str, value: Any) -> int:
        allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        # bool is an int subclass; ``interval = true`` is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(key, value, allowed)
        if value < lo or (hi is not None and value > hi):
            raise SettingsError(key, value, allowed)
        return value

    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


def optional_int_field(lo: int, doc: str = "") -> Any:
    """An integer ``>= lo``, or absent (None)."""

    def check(key: str, value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise SettingsError(key, value, f"an integer >= {lo}, or leave it out")
        return value

    return dataclasses.field(default=None, metadata={"check": check, "doc": doc})


def float_field(default: float, lo: float, hi: float, doc: str = "") -> Any:
    """A finite number in ``[lo, hi]``; TOML integers are accepted."""

    def check(key: str, value: Any) -> float:
        allowed = f"a number from {lo} to {hi}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(key, value, allowed)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise SettingsError(key, value, allowed)
        return float(value)

    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


def bool_field(default: bool, doc: str = "") -> Any:
    def check(key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise SettingsError(key, value, "true or false")
        return value

    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


def range_field(default: tuple[float, float], lo: float, hi: float, doc: str = "") -> Any:
    """A ``[start, end]`` pair of numbers with ``lo <= start < end <= hi`` (a timestep window)."""

    def check(key: str, value: Any) -> tuple[float, float]:
        allowed = f"a pair [start, end] of numbers with {lo} <= start < end <= {hi}"
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise SettingsError(key, value, allowed)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise SettingsError(key, value, allowed)
        start, end = float(value[0]), float(value[1])
        if not lo <= start < end <= hi:
            raise SettingsError(key, value, allowed)
        return (start, end)

    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


def custom_field(default: Any, check: Checker, doc: str = "") -> Any:
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


def parse_config(cls: type, table: dict[str, Any]) -> Any:
    """``cls(**table)`` with every key known and every value checked; defaults fill the rest."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            allowed = ", ".join(["name", *fields]) if fields else "name"
            raise SettingsError(
                key, value, f"unknown setting for cacher {cls.name!r}; known: {allowed}", hint=did_you_mean(key, fields)
            )
        values[key] = fields[key].metadata["check"](key, value)
    return cls(**values)


def to_plain(value: Any) -> Any:
    """JSON-ready copy of a config value (tuples become lists)."""
    if isinstance(value, tuple):
        return [to_plain(v) for v in value]
    return value
