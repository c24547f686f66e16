"""The lowering-target seam: everything about one kind of sparse layer in one place.

A target turns a site's dense op (e.g. a linear) into a sparse custom op, in PyTorch and in ONNX.
It owns, for its layers:

    kinds                    the site ops it handles (`Site.op`: linear, addmm, matmul, conv, ...)
    plan(gm, node, site, block)   match and check: can this site be lowered, in which layout, and
                             what does the cost model expect (a `LayerPlan`; `lower=False` with the
                             reason when it cannot)
    lower(gm, node, plan, int8)   pack the weight and replace the node by a call of `torch_op()`
    torch_op()               the torch custom op the lowered GraphModule calls (runs in PyTorch)
    check_lowered(gm, plan)  the verifier's hook: what is wrong with a lowered site ('' if nothing)
    onnx_translation()       torch.onnx's custom translation of the op (one custom-domain node)
    onnx_nodes(graph)        the nodes of an exported graph that are this target's
    check_onnx(node, attached)    the ONNX verifier's hook for one of them
    attach_functions(model)  the model-local ONNX function bodies (standard ops) of those nodes, so
                             the file also runs on stock onnxruntime

Policy (which eligible layers to lower: cost / always / never, `min_speedup`) stays in the
choose_sparse_layers pass; a target only says what is possible and what it would cost.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx

from sparsec.ir import LayerPlan
from sparsec.site import Site


class LoweringTarget:
    name: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]

    def torch_op(self) -> Any:
        raise NotImplementedError

    def plan(self, gm: fx.GraphModule, node: fx.Node, site: Site,
             block: tuple[int, int] | None = None) -> LayerPlan:
        raise NotImplementedError

    def lower(self, gm: fx.GraphModule, node: fx.Node, plan: LayerPlan, int8: bool = False) -> fx.Node:
        raise NotImplementedError

    def check_lowered(self, gm: fx.GraphModule, plan: LayerPlan) -> str:
        return ""

    def onnx_translation(self) -> dict[Any, Callable[..., Any]]:
        return {}

    def onnx_nodes(self, graph: Any) -> list[Any]:
        return []

    def check_onnx(self, node: Any, attached: bool) -> str:
        """The ONNX verifier's hook: what is wrong with one of this target's nodes ('' if nothing);
        `attached`: the attach_functions pass has run (the node names its function overload)."""
        return ""

    def attach_functions(self, model: Any) -> int:
        return 0

    def calls(self, gm: fx.GraphModule) -> list[fx.Node]:
        """The call_function nodes of this target's torch op."""
        op = self.torch_op()
        return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == op]

    @staticmethod
    def check_packed_node(node: Any, inputs: tuple[str, ...], variant: Any, attached: bool) -> str:
        """The checks every sparsec node of packed blocks takes ('' when it passes): N and K
        positive, X and the three weight inputs present, no more inputs than `inputs`, a variant
        that `variant.of` reads and, once functions are attached, the overload naming it."""
        n, k = node.attributes.get("N"), node.attributes.get("K")
        if n is None or k is None or n.as_int() <= 0 or k.as_int() <= 0:
            return "attributes N and K must be positive integers"
        if len(node.inputs) < 4 or any(v is None for v in node.inputs[:4]):
            return "inputs X, values, block_cols and row_nnz are required"
        if len(node.inputs) > len(inputs):
            return f"{len(node.inputs)} inputs, at most {len(inputs)}"
        try:
            found = variant.of(node)
        except ValueError as exc:
            return str(exc)
        if attached and node.overload != found.overload:
            return f"overload {node.overload!r} does not name its variant {found.overload!r}"
        return ""

    @staticmethod
    def is_float_matrix(weight: torch.Tensor) -> str:
        """Why a weight is not a float32 matrix ('' when it is)."""
        if weight.dim() != 2:
            return f"weight has {weight.dim()} dimensions; the block-sparse op takes a matrix"
        if weight.dtype != torch.float32:
            return f"weight is {weight.dtype}; the block-sparse op takes float32"
        return ""
