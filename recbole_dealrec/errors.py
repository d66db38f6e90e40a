"""The plugin's one error type for bad user input."""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input (a config key or value), reported before any long work starts."""
