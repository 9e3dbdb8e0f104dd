"""One registry per extension point (backbones, datasets, generators, detectors, strategies).

Each extension point creates a :class:`Registry` and exposes three plain functions built on
it, in the timm style: ``register_x`` (a decorator), ``create_x(name, **kwargs)`` and
``list_x()``. Unknown names raise :class:`UnknownNameError`, whose message lists the valid
names so a typo is fixed from the error alone.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that no entry of a registry carries."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps a name to a factory (a class or a function) for one extension point.

    ``kind`` is the human word used in messages ("backbone", "dataset", ...).
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None, *, overwrite: bool = False) -> Callable:
        """Decorator: ``@registry.register("name")`` (default name: the object's ``__name__``)."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            key = name or factory.__name__
            if key in self._entries and not overwrite:
                raise ValueError(
                    f"{self.kind} {key!r} is already registered; pass overwrite=True to replace it"
                )
            self._entries[key] = factory
            return factory

        return decorate

    def add(self, name: str, factory: Callable[..., T], *, overwrite: bool = False) -> None:
        """Register ``factory`` under ``name`` without decorator syntax."""
        self.register(name, overwrite=overwrite)(factory)

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; raises :class:`UnknownNameError` listing valid names."""
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries)) or "(none registered)"
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid names: {valid}"
            ) from None

    def create(self, name: str, /, **kwargs: Any) -> T:
        """Build the entry registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
