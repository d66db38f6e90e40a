"""One small registry class, used for selection methods and for the plugin's models."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Generic, Iterator, Sequence, TypeVar

from recbole_dealrec.errors import ConfigError

T = TypeVar("T")


def import_submodules(package: str, path: Sequence[str]) -> None:
    """Import every module and subpackage of ``package`` (its ``__path__``): each registers what it defines, so a new
    method, signal or backend is its own file, not also a line in a list of imports."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


class Registry(Generic[T]):
    """Name -> object mapping whose lookups fail with the list of known names.

    ``kind`` names the config key the registry serves (e.g. ``sampler``), so errors say which key was wrong.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; known {self.kind}s: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
