"""Pruning methods (criteria), registered by name.

A method is one file in this package: a subclass of `Method` decorated with `@register`. It
declares its spec keys (`options`), how the forward pass applies the mask (`mask_op`), and how the
importance of each block is computed when masks are recomputed (`importance`, or `select`).
Every module of this package is imported here, so adding a method is one file (plus its spec in
specs/ and its test); nothing else in the tree changes.
"""
from __future__ import annotations

import importlib
import pkgutil

from sparsec.methods.base import Method, SiteState, get, names, register, registered

# The built-in methods register in the order of docs/spec.md (the movement-pruning paper, PINS,
# loss modelling, DynSparse); any other module of the package after them, by name.
_ORDER = ("magnitude", "movement", "soft_movement", "l0", "pins", "sensitivity", "loss_modelling", "dynsparse")
for _module in sorted((m.name for m in pkgutil.iter_modules(__path__)),
                      key=lambda name: (_ORDER.index(name) if name in _ORDER else len(_ORDER), name)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Method", "SiteState", "get", "names", "register", "registered"]
