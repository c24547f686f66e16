"""choose_sparse_layers: decide, per site, whether its block-sparse form pays off.

before: a baked graph (masks multiplied into the weights).
after:  the same graph; GraphInfo.attached["lowering"] maps every site to a LayerPlan saying
        whether lower_block_sparse will rewrite it, in which orientation and block, and why.
A site is lowered when its op is a linear, or an addmm / matmul whose right operand is the
weight (GPT-2's Conv1D stores it [in, out]: it is packed transposed), its weight is a float32
matrix, and the cost model (sparsec.lowering.cost) estimates at least `min_speedup`.
Convolutions stay dense.
requires: masks_baked.  ensures: layers_chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.ir import Site, get_attr_value, graph_info
from sparsec.lowering import cost
from sparsec.passes.find_sites import site_operand
from sparsec.pipeline import Pass, PassResult

POLICIES = ("cost", "always", "never")


@dataclass(frozen=True)
class LayerPlan:
    """What lowering does with one site, and why."""

    site: str
    op: str                                   # linear | addmm | matmul | conv
    lower: bool
    reason: str
    transposed: bool = False                  # the weight is stored [K, N]
    block: tuple[int, int] | None = None      # BR, BC of the [N, K] matrix
    stats: cost.BlockStats | None = None
    speedup: float | None = None              # the cost model's estimate

    def to_dict(self) -> dict:
        out = {"site": self.site, "op": self.op, "lowered": self.lower, "reason": self.reason,
               "transposed": self.transposed, "speedup_estimate": self.speedup}
        if self.stats is not None:
            s = self.stats
            out.update(shape=list(s.shape), block=list(s.block), block_density=s.block_density,
                       stored=s.stored, blocks_per_row=s.max_per_row)
        return out


def lowering_plans(gm: fx.GraphModule) -> dict[str, LayerPlan]:
    """The plans choose_sparse_layers recorded (empty before it ran)."""
    return graph_info(gm).attached.get("lowering", {})


def site_node(gm: fx.GraphModule, name: str) -> tuple[fx.Node | None, str]:
    """The op node consuming site `name`'s weight, or None and why not."""
    weights = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    users = [u for w in weights for u in w.users]
    if len(users) != 1:
        return None, f"weight has {len(users)} uses; lowering needs exactly one"
    return users[0], ""


@dataclass(frozen=True)
class ChooseSparseLayers(Pass):
    name = "choose_sparse_layers"
    stage = "lower"
    requires = ("masks_baked",)
    ensures = ("layers_chosen",)

    policy: str = "cost"                       # cost | always (every eligible site) | never
    min_speedup: float = cost.DEFAULT_MIN_SPEEDUP
    block: tuple[int, int] | None = None       # pack with this block instead of the site's

    def run(self, gm: fx.GraphModule) -> PassResult:
        if self.policy not in POLICIES:
            raise self.error(f"unknown policy {self.policy!r} (allowed: {', '.join(POLICIES)})")
        info = graph_info(gm)
        info.attached["lowering"] = {name: self.plan(gm, site) for name, site in info.sites.items()}
        return PassResult(gm, modified=False)

    def plan(self, gm: fx.GraphModule, site: Site) -> LayerPlan:
        node, why = site_node(gm, site.name)
        if node is None:
            return LayerPlan(site.name, site.op, False, why)
        found = site_operand(node, gm)
        kind = found[0] if found else site.op
        if kind == "conv":
            return LayerPlan(site.name, kind, False, "convolution: stays dense (the block-sparse op "
                                                     "covers linears and matmuls)")
        weight = get_attr_value(gm, site.name)
        reason = _unsupported(gm, node, kind, found, weight)
        if reason:
            return LayerPlan(site.name, kind, False, reason)
        transposed = kind in ("addmm", "matmul")
        matrix = weight.detach().t() if transposed else weight.detach()
        block = self.block or ((site.block[1], site.block[0]) if transposed else site.block)
        stats = cost.block_stats(matrix, block)
        speedup = cost.estimated_speedup(stats)
        facts = (f"{stats.work:.1%} of the dense work: {stats.kept_blocks}/"
                 f"{stats.grid[0] * stats.grid[1]} blocks of {block[0]}x{block[1]}, "
                 f"up to {stats.max_per_row} per block row")
        if self.policy == "never":
            lower, reason = False, "lowering disabled (policy never)"
        elif self.policy == "always":
            lower, reason = True, f"policy always; est. {speedup:.1f}x, {facts}"
        elif speedup >= self.min_speedup:
            lower, reason = True, f"est. {speedup:.1f}x faster; {facts}"
        else:
            lower, reason = False, (f"too dense to gain: est. {speedup:.2f}x < {self.min_speedup}x; "
                                    f"{facts}")
        return LayerPlan(site.name, kind, lower, reason, transposed, block, stats, speedup)


def _unsupported(gm: fx.GraphModule, node: fx.Node, kind: str, found: tuple[str, int] | None,
                 weight: torch.Tensor) -> str:
    """Why this site's op cannot become a block_sparse_linear ('' when it can)."""
    if found is None:
        return f"op {node.target} is not a linear, addmm or matmul"
    if weight.dim() != 2:
        return f"weight has {weight.dim()} dimensions; the block-sparse op takes a matrix"
    if weight.dtype != torch.float32:
        return f"weight is {weight.dtype}; the block-sparse op takes float32"
    position = found[1]
    if kind == "matmul" and position != 1:
        return "weight is the left operand of the matmul (W @ x): stays dense"
    if kind == "addmm":
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return "addmm with alpha/beta other than 1: stays dense"
        bias = node.args[0]
        if not isinstance(bias, fx.Node):
            return "addmm whose added term is not a tensor: stays dense"
        value = get_attr_value(gm, str(bias.target)) if bias.op == "get_attr" else bias.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != weight.shape[1]:
            return "addmm whose added term is not a bias vector: stays dense"
    if kind == "linear" and len(node.args) < 2:
        return "linear without a positional weight"
    return ""
