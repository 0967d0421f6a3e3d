"""One registry per extension point: bridge kinds, KV compression methods, training jobs.

A kind registers itself under the name its manifest or setting uses, the way a kvpress press or a
transformers cache layer type is one class plus its registration:

    BRIDGES = Registry("bridge architecture")

    @BRIDGES.register("aligned")
    class AlignedBridge(BridgeBase): ...

    BRIDGES.get("aligned")   # the class; an unknown name raises UnknownKind listing the known ones

The registries themselves live beside their base classes (`bridge/`, `compression/`, the job
launcher); this module is only the mechanism, so the core imports nothing above it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownKind(KeyError):
    """A name no entry of the registry answers to; the message lists the names that do."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message reads better plain
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> entry (usually a class) for one extension point; names are unique."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` above the class (or function) it names."""
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{self.kind} names are short identifiers, not {name!r}")

        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is registered twice "
                                 f"({self._entries[name]!r} and {entry!r})")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownKind(f"unknown {self.kind} {name!r}; known: {', '.join(self.names()) or 'none'}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
