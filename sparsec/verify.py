"""The FX verifier: run after every FX pass.

Checks fx's own lint plus sparsec's invariants for the facts established so far:
- sites_selected: every site's weight is a parameter of the recorded shape, its padding is
  what its block implies;
- masks_inserted: one mask node per site, mask shaped like the weight, scores shaped like the
  block grid (exactly when the method learns scores), the method's state buffers present, and no
  use of a site's weight other than its mask node (no unmasked use). A mask node calls a function
  of `ops.MASK_OPS`, or (for masks drawn in every training forward, L0) an `ops.MaskModule`;
  either way its first two arguments are the weight and the mask;
- masks_baked: no mask or score node or attribute is left;
- lowered: every lowered site is computed by its lowering target's op, checked by the target
  (`LoweringTarget.check_lowered`), and its dense weight is gone.
The ONNX passes have their own verifier (sparsec.lowering.onnx_graph.verify).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from sparsec import blocks, methods
from sparsec.errors import PassError
from sparsec.ir import (ROLE_MASK, ROLE_MASKED_WEIGHT, ROLE_SCORES, get_attr_value, graph_info,
                        node_info, nodes_with_role, state_name)
from sparsec.lowering import targets
from sparsec.ops import MASK_OPS, MaskModule


def verify(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError with the offending node in the message
        raise PassError(f"graph is malformed: {exc}") from exc
    facts = graph_info(gm).facts
    if "sites_selected" in facts:
        _check_sites(gm)
    if "masks_inserted" in facts:
        _check_masks(gm)
    if "masks_baked" in facts:
        _check_baked(gm)
    if "lowered" in facts:
        _check_lowered(gm)


def _check_sites(gm: fx.GraphModule) -> None:
    info = graph_info(gm)
    lowered = set(info.lowered_sites())
    for name, site in info.sites.items():
        if name in lowered:
            continue
        try:
            weight = get_attr_value(gm, name)
        except AttributeError as exc:
            raise PassError(f"site {name!r}: weight is missing from the module") from exc
        if not isinstance(weight, torch.nn.Parameter):
            raise PassError(f"site {name!r}: weight is not a parameter")
        if tuple(weight.shape) != site.shape:
            raise PassError(f"site {name!r}: weight shape {tuple(weight.shape)} != recorded {site.shape}")
        if blocks.padding(site.shape, site.block) != site.padding:
            raise PassError(f"site {name!r}: block {site.block} does not divide {site.shape} "
                            f"and the padding recorded is wrong")


def _check_masks(gm: fx.GraphModule) -> None:
    info = graph_info(gm)
    per_site = Counter(node_info(n).site for n in nodes_with_role(gm, ROLE_MASK))  # type: ignore[union-attr]
    masked = {node_info(n).site: n for n in nodes_with_role(gm, ROLE_MASKED_WEIGHT)}  # type: ignore[union-attr]
    scores = {node_info(n).site: n for n in nodes_with_role(gm, ROLE_SCORES)}  # type: ignore[union-attr]
    for name, site in info.sites.items():
        if per_site[name] != 1:
            raise PassError(f"site {name!r}: expected one mask node, found {per_site[name]}")
        node = masked.get(name)
        if node is None or not _is_mask_op(gm, node):
            raise PassError(f"site {name!r}: no mask op applies its mask")
        weight = get_attr_value(gm, name)
        mask = get_attr_value(gm, str(node.args[1].target))  # type: ignore[union-attr]
        if mask.shape != weight.shape:
            raise PassError(f"site {name!r}: mask shape {tuple(mask.shape)} != weight shape "
                            f"{tuple(weight.shape)}")
        method = methods.get(site.method)  # type: ignore[arg-type]
        if method.learns_scores != (name in scores):
            raise PassError(f"site {name!r}: method {site.method} "
                            f"{'needs' if method.learns_scores else 'must not have'} a score node")
        if method.learns_scores:
            value = get_attr_value(gm, str(scores[name].target))
            if tuple(value.shape) != blocks.grid_shape(site.shape, site.block):
                raise PassError(f"site {name!r}: scores shape {tuple(value.shape)} != block grid "
                                f"{blocks.grid_shape(site.shape, site.block)}")
        for key in method.state:
            try:
                get_attr_value(gm, state_name(name, key))
            except AttributeError as exc:
                raise PassError(f"site {name!r}: method {site.method} state buffer "
                                f"{state_name(name, key)!r} is missing") from exc
        weight_nodes = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
        for wnode in weight_nodes:
            bad = [u for u in wnode.users if u is not node]
            if bad:
                raise PassError(f"site {name!r}: weight used without its mask by node {bad[0].name!r}")


def _is_mask_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in MASK_OPS
    if node.op == "call_module":
        try:
            return isinstance(gm.get_submodule(str(node.target)), MaskModule)
        except AttributeError:
            return False
    return False


def _check_baked(gm: fx.GraphModule) -> None:
    for role in (ROLE_MASK, ROLE_SCORES, ROLE_MASKED_WEIGHT):
        left = next(nodes_with_role(gm, role), None)
        if left is not None:
            raise PassError(f"node {left.name!r} ({role}) is still in the graph after baking")


def _check_lowered(gm: fx.GraphModule) -> None:
    info = graph_info(gm)
    for name in info.lowered_sites():
        plan = info.lowering[name]
        target = targets.get(plan.target)
        if any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            raise PassError(f"site {name!r}: the dense weight is still used after lowering")
        problem = target.check_lowered(gm, plan)
        if problem:
            raise PassError(f"site {name!r}: {problem}")
