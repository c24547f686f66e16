"""choose_sparse_layers: decide, per site, whether its sparse form pays off.

before: a baked graph (masks multiplied into the weights).
after:  the same graph; GraphInfo.lowering maps every site to a LayerPlan saying which lowering
        target would rewrite it (sparsec.lowering.targets: today block_sparse_linear for linear,
        addmm and matmul sites), in which orientation and block, whether lower_block_sparse will,
        and why. A site is lowered when a target handles its op and accepts it (the target's
        match and check), and the policy says so: `cost` when the target's cost model estimates at
        least `min_speedup`, `always` whenever possible, `never` not at all.
requires: masks_baked.  ensures: layers_chosen.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch.fx as fx

from sparsec.ir import LayerPlan, graph_info
from sparsec.lowering import cost, targets
from sparsec.pipeline import Pass, PassResult
from sparsec.site import Site
from sparsec.site_ops import site_node

POLICIES = ("cost", "always", "never")


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
        speedup = plan.speedup or 0.0
        if self.policy == "never":
            return replace(plan, lower=False, reason="lowering disabled (policy never)")
        if plan.speedup is None:    # the target cannot say whether it pays: only on request
            if self.policy == "always":
                return replace(plan, reason=f"policy always; no speed estimate, {plan.reason}")
            return replace(plan, lower=False, reason=f"no speed estimate for {plan.op} layers: lowered "
                                                     f"only with policy = always; {plan.reason}")
        if self.policy == "always":
            return replace(plan, reason=f"policy always; est. {speedup:.1f}x, {plan.reason}")
        if speedup >= self.min_speedup:
            return replace(plan, reason=f"est. {speedup:.1f}x faster; {plan.reason}")
        return replace(plan, lower=False, reason=f"too dense to gain: est. {speedup:.2f}x < "
                                                 f"{self.min_speedup}x; {plan.reason}")
