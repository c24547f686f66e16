"""The sparsity site (the weight operand of a linear, convolution or matmul-with-parameter node)
and its live tensors during training.

Near the bottom of the import graph (only sparsec.errors below it) so that every layer (methods,
mask selection, passes, the Program, reports) can name sites without importing the IR.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sparsec.errors import TrainingError


@dataclass(frozen=True)
class Site:
    """A sparsity site: the weight operand of a linear, convolution or matmul-with-parameter node.

    `name` is the parameter's name in `model.named_parameters()`. Block geometry refers to the
    weight's matrix view (see sparsec.blocks). Fields after `source` are filled by select_sites.
    """

    name: str
    shape: tuple[int, ...]
    op: str                      # linear | conv | addmm | matmul
    source: str = ""             # the user's source line of the consuming op, when known
    group: int | None = None     # index into the spec's [[prune]] list
    method: str | None = None
    density: float | None = None  # final density asked for this site's group
    scope: str | None = None
    block: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # rows / cols missing from the last partial block
    balanced: bool = False       # every block row keeps the same number of blocks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SiteState:
    """The live tensors of one site, as a method sees them at `Program.step()`: the weight
    parameter, its mask buffer, its scores (methods that learn them) and the method's per-site
    state buffers (`Method.init_state` keys), all shared with the Program's module."""

    site: Site
    weight: torch.nn.Parameter
    mask: torch.Tensor
    scores: torch.nn.Parameter | None
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def grad(self, method: str) -> torch.Tensor:
        """The weight's gradient of the last backward; a clear error when there is none."""
        grad = self.weight.grad
        if grad is None:
            raise TrainingError(
                f"method {method!r} reads the gradient of site {self.site.name!r} at prog.step(), "
                f"but it has none: call loss.backward(), optimizer.step(), prog.step(), and only "
                f"then optimizer.zero_grad()")
        return grad
