"""find_sites: record every sparsity site of the graph.

before: a captured graph.  after: the same graph; GraphInfo.candidates lists every site
(the weight operand of a linear, convolution, addmm or matmul node that is a parameter), and
GraphInfo.left_out says for every other parameter of two or more dimensions why it is not a site.
Duplicate get_attr nodes of one parameter (symbolic_trace emits one per use) are merged first,
so each weight is one node.
requires: mode_aware.  ensures: sites_found.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from sparsec.ir import Site, get_attr_value, graph_info, source_line
from sparsec.pipeline import Pass, PassResult
from sparsec.site_ops import site_operand

def merge_get_attrs(gm: fx.GraphModule) -> bool:
    """One get_attr node per target, placed before its first use. A tied parameter (one object
    under two names, e.g. GPT-2's lm_head and wte) is renamed to its `named_parameters()` name."""
    first: dict[str, fx.Node] = {}
    changed = False
    canonical = {id(p): name for name, p in gm.named_parameters()}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        name = canonical.get(id(get_attr_value(gm, str(node.target))), str(node.target))
        if name != node.target:
            node.target = name
            changed = True
        keep = first.setdefault(str(node.target), node)
        if keep is not node:
            node.replace_all_uses_with(keep)
            gm.graph.erase_node(node)
            changed = True
    if changed:  # a merged node may now be used before it is defined: move get_attrs to the top
        anchor = next(n for n in gm.graph.nodes if n.op != "placeholder") if len(gm.graph.nodes) else None
        for node in first.values():
            if anchor is not None and node is not anchor:
                anchor.prepend(node)
    return changed


def _describe_use(user: fx.Node) -> str:
    target = user.target
    name = getattr(target, "__name__", None) or str(target)
    return f"{user.op} {name}" if user.op != "call_function" else str(name)


@dataclass(frozen=True)
class FindSites(Pass):
    name = "find_sites"
    stage = "select"
    requires = ("mode_aware",)
    ensures = ("sites_found",)

    def run(self, gm: fx.GraphModule) -> PassResult:
        modified = merge_get_attrs(gm)
        info = graph_info(gm)
        info.candidates.clear()
        info.left_out.clear()
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            value = get_attr_value(gm, str(node.target))
            if not isinstance(value, torch.nn.Parameter) or value.dim() < 2:
                continue
            name = str(node.target)
            site_uses = [(u, site_operand(u, gm)) for u in node.users]
            good = [(u, k) for u, k in site_uses if k is not None and u.args[k[1]] is node]
            other = [u for u, k in site_uses if k is None or u.args[k[1]] is not node]
            if not good:
                uses = ", ".join(sorted({_describe_use(u) for u in node.users})) or "nothing"
                info.left_out[name] = f"not the weight of a linear/conv/matmul (used by {uses})"
                continue
            if other:
                uses = ", ".join(sorted({_describe_use(u) for u in other}))
                info.left_out[name] = (f"also used by {uses} (tied or shared weight): masking it "
                                       f"would change that use too")
                continue
            kind = good[0][1][0]
            info.candidates[name] = Site(name=name, shape=tuple(value.shape), op=kind,
                                         source=source_line(good[0][0]))
        return PassResult(gm, modified=modified)
