"""The Method interface and its registry.

A method is one file in this package: a subclass of `Method` decorated with `@register`. The
Program calls its hooks and never branches on what a method is; every hook has a default, so a
method overrides only what it needs.

At rewrite time (insert_masks):
    init_scores(weight, site)        block-grid scores (a Parameter) for methods that learn them
    init_state(weight, site)         per-site state tensors, registered as buffers `<site>_<key>`
                                     of the GraphModule (so `prog.state_dict()` resumes exactly)
    mask_op() / mask_op_args(...)    the function the mask node calls (sparsec.ops)
    mask_module(site)                or an nn.Module the mask node calls instead (call_module),
                                     for masks that are drawn in every training forward (L0)
At every `prog.step()`, in this order:
    observe(states, context)         read the step's gradients / optimizer update (before masks)
    select(states, density, scope, context)
                                     when masks are due: the new keep-grids, or None to leave the
                                     masks as they are; the default keeps everything at density 1
                                     and otherwise the Top_v of `importance` (sparsec.masking)
    after_step(states, context)      after masks: e.g. zero pruned weights (PINS Eq 2)
In the loss:
    regularization(states)           a term added to the loss (None: nothing)
For data estimates (loss modelling):
    estimate_options()               how many examples `prog.estimate_fisher` needs (None: none)
    accept_estimate(state, ...)      the gradient / curvature it measured

Class attributes describe the method (they feed the spec schema, its checks and docs/spec.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from sparsec import masking
from sparsec.schema import Field
from sparsec.site import Site, SiteState

__all__ = ["Method", "SiteState", "StepContext", "MaskContext", "register", "get", "names", "registered"]

_METHODS: dict[str, type["Method"]] = {}


@dataclass
class StepContext:
    """What `Program.step()` passes to `observe` and `after_step`: the step being completed (the
    one whose gradients are in `.grad`) and the optimizer that has just applied its update."""

    step: int
    optimizer: torch.optim.Optimizer | None


@dataclass
class MaskContext:
    """What the Program passes to `select` when a group's masks are due: the step (`prog.step_count`;
    0 when the Program is built), the [schedule] settings, the density asked at the previous mask
    update, the step of the last `prog.estimate_fisher` (-1: never) and the attached optimizer."""

    step: int
    kind: str
    total: int
    every: int
    optimizer: torch.optim.Optimizer | None
    previous_density: float = 1.0
    estimated_at: int = -1

    def prunes(self, density: float) -> bool:
        """True when `density` is below the density of the previous mask update."""
        return density < self.previous_density


class Method:
    """A pruning criterion.

    Class attributes:
      name            spec value of `method`
      summary         one line for the README and docs
      paper           citation, paper and equation
      options         method-specific spec keys
      learns_scores   True when the method owns a score tensor trained by the optimizer
      state           names of the per-site state buffers `init_state` returns
      scopes          the `scope` values the method accepts
      needs_gradients True when `observe` reads `weight.grad` (masks cannot be ranked at step 0)
      schedule_kinds  the `[schedule] kind` values the method accepts (empty: every kind)
      balances        True when its masks come from masking.keep_top, which honours a group's
                      `balanced = true` (a method choosing blocks otherwise sets False)
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    options: ClassVar[dict[str, Field]] = {}
    learns_scores: ClassVar[bool] = False
    state: ClassVar[tuple[str, ...]] = ()
    scopes: ClassVar[tuple[str, ...]] = ("local", "global")
    needs_gradients: ClassVar[bool] = False
    schedule_kinds: ClassVar[tuple[str, ...]] = ()
    balances: ClassVar[bool] = True

    def __init__(self, options: Mapping[str, Any] | None = None):
        opts = {key: f.default for key, f in self.options.items()}
        opts.update(options or {})
        self.opts = opts

    @classmethod
    def observes(cls) -> bool:
        """True when the method overrides `observe` (the Program skips the call otherwise, which
        keeps `step()` cheap for the other methods)."""
        return cls.observe is not Method.observe

    @classmethod
    def acts_after_step(cls) -> bool:
        """True when the method overrides `after_step`."""
        return cls.after_step is not Method.after_step

    @classmethod
    def regularizes(cls) -> bool:
        """True when the method overrides `regularization` (the Program skips it otherwise)."""
        return cls.regularization is not Method.regularization

    # ------------------------------------------------------------------------ rewrite time
    def init_scores(self, weight: torch.Tensor, site: Site) -> torch.Tensor | None:
        """Initial block-grid scores for a site, or None when the method learns none."""
        return None

    def init_state(self, weight: torch.Tensor, site: Site) -> dict[str, torch.Tensor]:
        """Initial per-site state tensors, one per name in `state`."""
        return {}

    def mask_op(self) -> Callable[..., torch.Tensor]:
        """The function the mask node calls (from sparsec.ops)."""
        raise NotImplementedError

    def mask_op_args(self, state_nodes: Mapping[str, Any], site: Site) -> tuple:
        """Arguments of the mask node: state_nodes maps 'weight', 'mask', 'scores' to fx nodes.
        The first two arguments are always the weight and the mask."""
        return (state_nodes["weight"], state_nodes["mask"])

    def mask_module(self, site: Site) -> torch.nn.Module | None:
        """An `ops.MaskModule` the mask node calls instead of `mask_op()`, or None."""
        return None

    # --------------------------------------------------------------------------- step time
    def observe(self, states: list[SiteState], context: StepContext) -> None:
        """Read the step's gradients / optimizer update into the per-site state buffers."""

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        """Block-grid importance (higher is kept), shape `blocks.grid_shape(site.shape, site.block)`."""
        raise NotImplementedError

    @torch.no_grad()
    def select(self, states: list[SiteState], density: float, scope: str,
               context: MaskContext) -> list[torch.Tensor] | None:
        """Keep-grids (bool or float) for the group's sites, or None to leave the masks as they are.
        Default: everything at density >= 1, else Top_v over `importance` within `scope`."""
        if density >= 1.0:
            return masking.all_kept(states)
        return masking.keep_top([self.importance(st) for st in states], states, density, scope)

    def after_step(self, states: list[SiteState], context: StepContext) -> None:
        """Called at the end of every `prog.step()`, after masks were recomputed (when due)."""

    def regularization(self, states: list[SiteState]) -> torch.Tensor | None:
        """The method's term of the loss, or None."""
        return None

    # --------------------------------------------------------------------------- estimates
    def estimate_options(self) -> dict[str, int] | None:
        """`{"fisher_examples": n, "fisher_chunk": c}` when masks need `prog.estimate_fisher(...)`
        before each pruning step (loss modelling), else None."""
        return None

    @torch.no_grad()
    def accept_estimate(self, state: SiteState, grad: torch.Tensor, fisher: torch.Tensor) -> None:
        """Store what `prog.estimate_fisher` measured for a site: the mean gradient and the
        diagonal curvature, both shaped like the weight."""


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
