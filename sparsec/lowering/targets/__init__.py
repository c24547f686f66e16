"""The lowering targets sparsec knows, by name and by the site ops they handle.

Every module of this package that defines a `LoweringTarget` subclass with a `name` is a target:
adding one (e.g. convolutions) is a new file here plus its native kernel under
sparsec/runtime/kernel/ (and its registration in sparsec_ort.cc) and its tests; nothing else changes.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from sparsec.lowering.targets.base import LoweringTarget

__all__ = ["LoweringTarget", "get", "for_kind", "all_targets", "onnx_translation"]


def _discover() -> dict[str, LoweringTarget]:
    found: dict[str, LoweringTarget] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, LoweringTarget) and cls is not LoweringTarget and cls.__module__ == module.__name__:
                found[cls.name] = cls()
    return found


_TARGETS = _discover()


def all_targets() -> list[LoweringTarget]:
    return list(_TARGETS.values())


def get(name: str) -> LoweringTarget:
    return _TARGETS[name]


def for_kind(kind: str) -> LoweringTarget | None:
    """The target that lowers sites whose op is `kind`, or None when none does."""
    return next((t for t in _TARGETS.values() if kind in t.kinds), None)


def onnx_translation() -> dict:
    """torch.onnx's custom translation table for every target's op."""
    table: dict = {}
    for target in _TARGETS.values():
        table.update(target.onnx_translation())
    return table
