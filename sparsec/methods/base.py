"""The Method interface and its registry.

A method is one file in this package: a subclass of `Method` decorated with `@register`. The
Program calls its hooks; every hook has a default, so a method overrides only what it needs:

    init_scores(weight, site)        block-grid scores (a Parameter) for methods that learn them
    init_state(weight, site)         per-site state tensors, registered as buffers `<site>_<key>`
                                     of the GraphModule (so `prog.state_dict()` resumes exactly)
    mask_op() / mask_op_args(...)    the function the mask node calls (sparsec.ops)
    mask_module(site)                or an nn.Module the mask node calls instead (call_module),
                                     for masks that are drawn in every training forward (L0)
    observe(states, context)         called at every `prog.step()` before masks are recomputed:
                                     gradient-based criteria read `weight.grad` here
    importance(state)                block-grid importance, higher is kept (Top_v over it)
    select(states, density, scope)   the mask grids directly (None: Top_v over `importance`)
    select_at(states, density, scope, context)
                                     the same, with the step being recomputed and the schedule
                                     (`MaskContext`); defaults to `select` (dynsparse needs the step)
    regularization(states)           a term added to the loss (None: nothing)
    accept_estimate(state, ...)      the gradient / diagonal Fisher of `prog.estimate_fisher`

Class attributes describe the method (they feed the spec schema, its checks and docs/spec.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch

from sparsec.errors import TrainingError
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
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # the method's init_state keys

    def grad(self, method: str) -> torch.Tensor:
        """The weight's gradient of the last backward; a clear error when there is none."""
        grad = self.weight.grad
        if grad is None:
            raise TrainingError(
                f"method {method!r} reads the gradient of site {self.site.name!r} at prog.step(), "
                f"but it has none: call loss.backward(), optimizer.step(), prog.step(), and only "
                f"then optimizer.zero_grad()")
        return grad


@dataclass
class StepContext:
    """What `Program.step()` passes to `Method.observe`: the step being completed (the one whose
    gradients are in `.grad`) and the optimizer that has just applied its update."""

    step: int
    optimizer: torch.optim.Optimizer | None


@dataclass
class MaskContext:
    """What `Program` passes to `Method.select_at` when it recomputes a group's masks: the step
    (`prog.step_count`; 0 when the Program is built), the [schedule] settings and the attached
    optimizer (None when none is attached)."""

    step: int
    kind: str
    total: int
    every: int
    optimizer: torch.optim.Optimizer | None


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
      density_target  False when the density is an outcome of the method's own keys (threshold,
                      lambda) rather than a target the schedule drives
      needs_gradients True when `observe` reads `weight.grad` (masks cannot be ranked at step 0)
      needs_estimate  True when masks need `prog.estimate_fisher(...)` before each pruning step
      prune_only      True when pruned blocks never come back (loss modelling, Algorithm 1)
      zeroes_pruned   True when `step()` sets pruned weights to zero in place (PINS Eq 2:
                      theta <- theta_hat * M), for methods whose mask op passes dense gradients
      schedule_kinds  the `[schedule] kind` values the method accepts (empty: every kind); the
                      Program rejects others when it is built
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    options: ClassVar[dict[str, Field]] = {}
    learns_scores: ClassVar[bool] = False
    state: ClassVar[tuple[str, ...]] = ()
    scopes: ClassVar[tuple[str, ...]] = ("local", "global")
    density_target: ClassVar[bool] = True
    needs_gradients: ClassVar[bool] = False
    needs_estimate: ClassVar[bool] = False
    prune_only: ClassVar[bool] = False
    zeroes_pruned: ClassVar[bool] = False
    schedule_kinds: ClassVar[tuple[str, ...]] = ()

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
    def regularizes(cls) -> bool:
        """True when the method overrides `regularization` (the Program skips it otherwise)."""
        return cls.regularization is not Method.regularization

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

    def observe(self, states: list[SiteState], context: StepContext) -> None:
        """Read the step's gradients / optimizer update into the per-site state buffers."""

    @torch.no_grad()
    def importance(self, state: SiteState) -> torch.Tensor:
        """Block-grid importance (higher is kept), shape `blocks.grid_shape(site.shape, site.block)`."""
        raise NotImplementedError

    def select(self, states: list[SiteState], density: float, scope: str) -> list[torch.Tensor] | None:
        """Block-grid masks for the group's sites (bool or float), or None for Top_v over
        `importance` at `density` within `scope`."""
        return None

    def select_at(self, states: list[SiteState], density: float, scope: str,
                  context: MaskContext) -> list[torch.Tensor] | None:
        """`select` for methods that need the step or the optimizer (default: `select`)."""
        return self.select(states, density, scope)

    def regularization(self, states: list[SiteState]) -> torch.Tensor | None:
        """The method's term of the loss, or None."""
        return None

    @torch.no_grad()
    def accept_estimate(self, state: SiteState, grad: torch.Tensor, fisher: torch.Tensor) -> None:
        """Store what `prog.estimate_fisher` measured for a site: the mean gradient and the
        diagonal empirical Fisher, both shaped like the weight."""


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
