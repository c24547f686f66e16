"""The verifier: run after every pass.

Checks fx's own lint plus sparsec's invariants for the facts established so far:
- sites_selected: every site's weight is a parameter of the recorded shape, its padding is
  what its block implies, and its node roles are set;
- masks_inserted: one mask node per site, mask shaped like the weight, scores shaped like the
  block grid (exactly when the method learns scores), the method's state buffers present, and no
  use of a site's weight other than its mask node (no unmasked use). A mask node calls a function
  of `ops.MASK_OPS`, or (for masks drawn in every training forward, L0) an `ops.MaskModule`;
  either way its first two arguments are the weight and the mask;
- masks_baked: no mask or score node or attribute is left;
- lowered: every lowered site is exactly one block_sparse_linear call on packed buffers of
  consistent shapes, and its dense weight is gone (`_check_lowered`).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from sparsec import blocks, methods
from sparsec.errors import PassError
from sparsec.ir import (ROLE_MASK, ROLE_MASKED_WEIGHT, ROLE_SCORES, get_attr_value, graph_info,
                        node_info, nodes_with_role)
from sparsec.ops import MASK_OPS, MaskModule
from sparsec.passes.insert_masks import state_name


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
    lowered = _lowered(gm)
    for name, site in graph_info(gm).sites.items():
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
        learns = methods.get(site.method).learns_scores  # type: ignore[arg-type]
        if learns != (name in scores):
            raise PassError(f"site {name!r}: method {site.method} "
                            f"{'needs' if learns else 'must not have'} a score node")
        if learns:
            value = get_attr_value(gm, str(scores[name].target))
            if tuple(value.shape) != blocks.grid_shape(site.shape, site.block):
                raise PassError(f"site {name!r}: scores shape {tuple(value.shape)} != block grid "
                                f"{blocks.grid_shape(site.shape, site.block)}")
        for key in methods.get(site.method).state:  # type: ignore[arg-type]
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


def _lowered(gm: fx.GraphModule) -> set[str]:
    plans = graph_info(gm).attached.get("lowering", {}) if "lowered" in graph_info(gm).facts else {}
    return {name for name, plan in plans.items() if plan.lower}


def _check_lowered(gm: fx.GraphModule) -> None:
    from sparsec.lowering.torch_op import op

    calls = {node_info(n).site: n for n in gm.graph.nodes  # type: ignore[union-attr]
             if n.op == "call_function" and n.target == op() and node_info(n) is not None}
    for name in _lowered(gm):
        node = calls.get(name)
        if node is None:
            raise PassError(f"site {name!r}: lowered but no block_sparse_linear call computes it")
        if any(n.op == "get_attr" and n.target == name for n in gm.graph.nodes):
            raise PassError(f"site {name!r}: the dense weight is still used after lowering")
        values, cols, nnz = (get_attr_value(gm, str(a.target)) for a in node.args[1:4])  # type: ignore[union-attr]
        n_out, k_in = node.args[6], node.args[7]
        r, s, br, bc = values.shape
        if (r != -(-n_out // br) or tuple(cols.shape) != (r, s) or tuple(nnz.shape) != (r,)  # type: ignore[operator]
                or cols.dtype != torch.int64 or (cols.numel() and int(cols.max()) * bc >= k_in)):  # type: ignore[operator]
            raise PassError(f"site {name!r}: packed blocks are inconsistent: values "
                            f"{tuple(values.shape)}, block_cols {tuple(cols.shape)}, row_nnz "
                            f"{tuple(nnz.shape)} for a [{n_out}, {k_in}] weight")
