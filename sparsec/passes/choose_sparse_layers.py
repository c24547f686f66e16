"""choose_sparse_layers: decide, per site, whether its sparse form pays off on the target runtime.

before: a baked graph (masks multiplied into the weights).
after:  the same graph; GraphInfo.lowering maps every site to a LayerPlan saying which lowering
        target would rewrite it (sparsec.lowering.targets: block_sparse_linear for linear, addmm
        and matmul sites, block_sparse_conv for conv2d), in which orientation and block, whether lower_block_sparse will,
        and why. A site is lowered when a target handles its op and accepts it (the target's
        match and check), and the policy says so: `cost` when the layer is at least `min_speedup`
        faster on the `runtime` the file is for (`sparsec`: onnxruntime with sparsec's kernel;
        `stock`: plain onnxruntime running the function body), `always` whenever possible,
        `never` not at all. Under `cost` the speedup is measured on this machine
        (sparsec.lowering.calibrate: the layer's shape, block and weight timed dense vs sparse on
        that runtime, cached), or, when measuring is off (`measure=False`, SPARSEC_MEASURE=0) or
        impossible (no kernel here), estimated by sparsec.lowering.cost, which the plan says.
        `keep_dense` names sites that stay dense whatever they cost, with the reason (the
        whole-file check of target stock).
requires: masks_baked.  ensures: layers_chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.fx as fx

from sparsec.ir import LayerPlan, get_attr_value, graph_info
from sparsec.lowering import calibrate, cost, targets
from sparsec.pipeline import Pass, PassResult
from sparsec.site import Site
from sparsec.site_ops import site_node

POLICIES = ("cost", "always", "never")
RUNTIMES = calibrate.TARGETS


@dataclass(frozen=True)
class ChooseSparseLayers(Pass):
    name = "choose_sparse_layers"
    stage = "lower"
    requires = ("masks_baked",)
    ensures = ("layers_chosen",)

    policy: str = "cost"                       # cost | always (every eligible site) | never
    min_speedup: float = cost.DEFAULT_MIN_SPEEDUP
    block: tuple[int, int] | None = None       # pack with this block instead of the site's
    runtime: str = "sparsec"                   # the file's target runtime: sparsec | stock
    measure: bool = True                       # time each layer on that runtime (policy cost)
    threads: int = 0                           # intra-op threads of those timings (0: default)
    int8: bool = False                         # the layers will hold INT8 blocks (timed so)
    keep_dense: tuple[tuple[str, str], ...] = ()   # (site, why): stays dense whatever it costs

    def run(self, gm: fx.GraphModule) -> PassResult:
        if self.policy not in POLICIES:
            raise self.error(f"unknown policy {self.policy!r} (allowed: {', '.join(POLICIES)})")
        if self.runtime not in RUNTIMES:
            raise self.error(f"unknown target runtime {self.runtime!r} (allowed: {', '.join(RUNTIMES)})")
        info = graph_info(gm)
        info.lowering = {name: self.plan(gm, site) for name, site in info.sites.items()}
        return PassResult(gm, modified=False)

    def plan(self, gm: fx.GraphModule, site: Site) -> LayerPlan:
        node, why = site_node(gm, site.name)
        if node is None:
            return LayerPlan(site.name, site.op, False, why)
        target = targets.for_kind(site.op)
        if target is None:
            kinds = ", ".join(k for t in targets.all_targets() for k in t.kinds)
            return LayerPlan(site.name, site.op, False, f"no lowering target for {site.op} sites "
                                                        f"(lowered: {kinds}): stays dense")
        plan = target.plan(gm, node, site, self.block)
        if not plan.lower:
            return plan
        plan = replace(plan, runtime=self.runtime, rows=_rows(node, plan.op, plan.conv))
        if self.policy == "never":
            return replace(plan, lower=False, reason="lowering disabled (policy never)")
        if plan.speedup is None:    # the target cannot say whether it pays: only on request
            if self.policy == "always":
                return replace(plan, reason=f"policy always; no speed estimate, {plan.reason}")
            return replace(plan, lower=False, reason=f"no speed estimate for {plan.op} layers: lowered "
                                                     f"only with policy = always; {plan.reason}")
        plan = self.priced(gm, node, plan)
        where = calibrate.RUNTIME[self.runtime]
        forced = dict(self.keep_dense).get(site.name)
        if forced:
            return replace(plan, lower=False, reason=f"{forced} (the layer alone: {_said(plan)})")
        if self.policy == "always":
            return replace(plan, reason=f"policy always ({plan.basis}: {_said(plan)} on {where}); "
                                        f"{plan.reason}")
        speedup = plan.measured.speedup if plan.measured is not None else (plan.speedup or 0.0)
        if speedup >= self.min_speedup:
            return replace(plan, reason=f"{_said(plan)} faster on {where} ({plan.basis}); {plan.reason}")
        return replace(plan, lower=False, reason=f"too dense to gain: {_said(plan, 2)} < {self.min_speedup}x "
                                                 f"on {where} ({plan.basis}); {plan.reason}")

    def priced(self, gm: fx.GraphModule, node: fx.Node, plan: LayerPlan) -> LayerPlan:
        """The plan with the constant model's estimate for the runtime and, when measuring is on
        and possible, the measurement (`basis` says which)."""
        stats, rows = plan.stats, plan.rows or calibrate.DEFAULT_ROWS
        assert stats is not None and plan.block is not None
        if plan.conv is not None:   # the function body runs onnxruntime's own Conv: speedup 1
            estimate = plan.speedup if self.runtime == "sparsec" else 1.0
        elif self.runtime == "sparsec":
            estimate = cost.estimated_speedup(stats, self.int8)
        else:
            estimate = cost.estimated_speedup_stock(stats, rows)
        plan = replace(plan, speedup=estimate)
        why_not = self._why_not_measured()
        if not why_not and plan.conv is not None and len(plan.conv) != 14:
            why_not = "the example inputs do not give the image size"
        if why_not:
            return replace(plan, basis=f"estimated, not measured: {why_not}")
        case = calibrate.LayerCase(self.runtime, stats.shape, plan.block, rows, stats.kept_blocks,
                                   stats.max_per_row, self.threads, self.int8, plan.conv or ())
        weight = get_attr_value(gm, plan.site).detach()
        matrix = (weight.t() if plan.transposed else weight.reshape(weight.shape[0], -1)).contiguous().numpy()
        try:
            measured = calibrate.measure_layer(case, matrix, _bias(gm, node, plan.op))
        except Exception as exc:  # onnxruntime raises its own types; the estimate stands, said so
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return replace(plan, basis=f"estimated, not measured: {first}")
        assumed = "" if plan.rows else " (the example inputs do not say: assumed)"
        what = f"input {'x'.join(map(str, plan.conv[10:]))}" if plan.conv else f"{rows} rows{assumed}"
        basis = f"measured{' (cached)' if measured.cached else ''}, {what}"
        return replace(plan, measured=measured, basis=basis)

    def _why_not_measured(self) -> str:
        if not self.measure:
            return "[export] measure = false"
        if calibrate.measuring_disabled():
            return calibrate.measuring_disabled()
        if self.runtime == "sparsec":
            reason = calibrate.kernel_unavailable()
            if reason:
                return f"sparsec's kernel is not available here ({reason})"
        return ""


def _said(plan: LayerPlan, digits: int = 1) -> str:
    """'measured 3.1x (0.75 -> 0.24 ms)' or 'est. 3.1x'."""
    if plan.measured is not None:
        m = plan.measured
        return f"measured {m.speedup:.{digits}f}x ({m.dense_ms:.3f} -> {m.sparse_ms:.3f} ms)"
    return f"est. {plan.speedup or 0.0:.{digits}f}x"


def _rows(node: fx.Node, op: str, conv: tuple[int, ...] | None = None) -> int | None:
    """Rows of X the site's op sees in the example inputs (the product of its leading dims); for a
    convolution, its output pixels (batch x height x width)."""
    if conv is not None:
        if len(conv) != 14:
            return None
        from sparsec.lowering.conv_op import output_size

        ho, wo = output_size(conv[:10], conv[12], conv[13])
        return conv[10] * ho * wo
    x = node.args[1] if op == "addmm" else node.args[0]
    value = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() < 1:
        return None
    dims = [d if isinstance(d, int) else getattr(getattr(d, "node", None), "hint", None)
            for d in value.shape[:-1]]
    if any(not isinstance(d, int) for d in dims):
        return None
    return max(1, math.prod(dims))


def _bias(gm: fx.GraphModule, node: fx.Node, op: str) -> np.ndarray | None:
    """The site's bias vector when it is a constant of the module, else None."""
    if op == "linear":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    elif op == "addmm":
        bias = node.args[0]
    elif op == "conv":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:
        return None
    if not isinstance(bias, fx.Node) or bias.op != "get_attr":
        return None
    value = get_attr_value(gm, str(bias.target))
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        return None
    return value.detach().float().contiguous().numpy()
