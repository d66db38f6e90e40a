"""The plugin's one error type for bad user input."""
from __future__ import annotations

import numbers


class ConfigError(ValueError):
    """Bad user input (a config key or value), reported before any long work starts."""


def check_integer(key: str, value, minimum: int, note: str = "", none_ok: bool = False) -> None:
    """``ConfigError`` "<key> must be an integer >= <minimum> (<note>), got <value>" unless ``value`` is an integer
    (not a bool) of at least ``minimum`` (or ``None`` with ``none_ok``): the one form of every integer key's check."""
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        extra = f" ({note})" if note else ""
        raise ConfigError(f"{key} must be an integer >= {minimum}{extra}{' or ~' if none_ok else ''}, got {value!r}")
