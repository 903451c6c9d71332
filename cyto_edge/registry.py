"""A name -> object registry that imports implementations on demand and refuses duplicates.

Backends (engines, camera sources, models) are one module each; a registry maps a key to
`"module:attribute"` so that a device without OpenVINO never imports it. A missing optional
dependency surfaces as `MissingExtra` naming the extra, never as a silent skip.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar

from cyto_edge.errors import BadInput

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind
        self._lazy: dict[str, str] = dict(lazy or {})
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def add_lazy(self, name: str, target: str) -> None:
        if name in self._lazy or name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._lazy[name] = target

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy))

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._lazy

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if name not in self._lazy:
            raise BadInput(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        module, _, attr = self._lazy[name].partition(":")
        mod = importlib.import_module(module)  # may raise MissingExtra from inside the module
        obj: Any = getattr(mod, attr) if attr else self._items.get(name)
        if obj is None:
            raise ValueError(f"{module} did not register {self.kind} {name!r}")
        self._items[name] = obj
        return obj
