"""The plugin's one error type for bad user input."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence


class ConfigError(ValueError):
    """Bad user input (a config key or value), reported before any long work starts."""


def check_integer(key: str, value, minimum: int, note: str = "", none_ok: bool = False) -> None:
    """``ConfigError`` "<key> must be an integer >= <minimum> (<note>), got <value>" unless ``value`` is an integer
    (not a bool) of at least ``minimum`` (or ``None`` with ``none_ok``): the one form of every integer key's check."""
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = f" ({note})" if note else ""
        raise ConfigError(f"{key} must be an integer >= {minimum}{extra}, got {value!r}")


def check_choice(key: str, value, allowed: Sequence[str], default: Optional[str] = None) -> str:
    """``value`` (empty or ``None`` = ``default``) if it is one of ``allowed``, else ``ConfigError`` "<key> must be
    one of [...], got <value>": the one form of every choice key's check."""
    if not value and default is not None:
        value = default
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    return value


def check_number(key: str, value, low: float, high: Optional[float] = None, low_open: bool = False,
                 high_open: bool = True, note: str = "", none_ok: bool = False) -> None:
    """``ConfigError`` "<key> must be a number >= low" (``> low`` with ``low_open``; "in [low, high)" with a ``high``,
    brackets by ``low_open`` / ``high_open``), with ``note`` in brackets, unless ``value`` is a finite real number
    (not a bool) in that range (or ``None`` with ``none_ok``): the one form of every real-valued key's check."""
    if none_ok and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
        allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    else:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    if not ok:
        extra = f" ({note})" if note else ""
        raise ConfigError(f"{key} must be a number {allowed}{extra}, got {value!r}")
