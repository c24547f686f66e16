"""Pruning methods (criteria), registered by name.

A method is one file in this package: a subclass of `Method` decorated with `@register`.
It declares its spec keys (`options`), how the forward pass applies the mask (`mask_op`), and how
the importance of each block is computed when masks are recomputed (`importance`).
Adding a method is one file and one spec; nothing else in the tree changes.
"""
from __future__ import annotations

from sparsec.methods.base import Method, SiteState, get, names, register, registered

# Import the built-in methods so they register themselves.
# The order is the order of docs/spec.md: movement-pruning paper, PINS, loss modelling, DynSparse.
from sparsec.methods import magnitude, movement, soft_movement, l0  # noqa: E402,F401,I001
from sparsec.methods import pins, sensitivity, loss_modelling  # noqa: E402,F401,I001
from sparsec.methods import dynsparse  # noqa: E402,F401,I001

__all__ = ["Method", "SiteState", "get", "names", "register", "registered"]
