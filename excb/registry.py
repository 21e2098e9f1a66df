"""Named constructors: the balancers, backbones and data formats a config can name, each built from keyword
arguments.

A :class:`Registry` maps a name to a callable. ``build(name, **kwargs)`` passes each entry only the keyword
arguments its signature accepts, so one call site can offer every config value and each entry takes what it
needs (a new balancer with a new option needs no change at the call site beyond offering the option).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries ``name → factory`` of one kind (``kind`` names it in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register a class or function under ``name`` (each name once)."""

        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return add

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as ``name``; ValueError naming the known ones if there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r} (known: {', '.join(self._entries)})") from None

    def build(self, name: str, /, **kwargs: Any) -> T:
        """``factory(**accepted)``: the entry called with those of ``kwargs`` its signature names (all of them if
        it takes ``**kwargs``)."""
        factory = self.get(name)
        params = inspect.signature(factory).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            accepted = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                              inspect.Parameter.POSITIONAL_OR_KEYWORD)}
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return factory(**kwargs)
