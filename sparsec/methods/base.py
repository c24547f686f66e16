"""The Method interface and its registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from sparsec.ir import Site
from sparsec.schema import Field

_METHODS: dict[str, type["Method"]] = {}


@dataclass
class SiteState:
    """The live tensors of one site, as a method sees them at `Program.step()`."""

    site: Site
    weight: torch.nn.Parameter
    mask: torch.Tensor
    scores: torch.nn.Parameter | None


class Method:
    """A pruning criterion.

    Class attributes describe it (they feed the spec schema and docs/spec.md):
      name      spec value of `method`
      summary   one line for the README and docs
      paper     citation, paper and equation
      options   method-specific spec keys
      learns_scores  True when the method owns a score tensor trained by the optimizer
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    options: ClassVar[dict[str, Field]] = {}
    learns_scores: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any] | None = None):
        opts = {key: f.default for key, f in self.options.items()}
        opts.update(options or {})
        self.opts = opts

    def init_scores(self, weight: torch.Tensor, site: Site) -> torch.Tensor | None:
        """Initial block-grid scores for a site, or None when the method learns none."""
        return None

    def mask_op(self) -> Callable[..., torch.Tensor]:
        """The function the mask node calls (from sparsec.ops)."""
        raise NotImplementedError

    def mask_op_args(self, state_nodes: Mapping[str, Any], site: Site) -> tuple:
        """Arguments of the mask node: state_nodes maps 'weight', 'mask', 'scores' to fx nodes."""
        return (state_nodes["weight"], state_nodes["mask"])

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        """Block-grid importance (higher is kept), shape `blocks.grid_shape(site.shape, site.block)`."""
        raise NotImplementedError


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    return _METHODS[name]


def names() -> list[str]:
    return list(_METHODS)


def registered() -> dict[str, type[Method]]:
    return dict(_METHODS)
