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

from sparsec.ir import (ROLE_SITE_OP, ROLE_WEIGHT, LayerPlan, del_attr, get_attr_value, node_info, packed_name,
                        set_attr_tensor, set_node_info)
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

    def replace_with_call(self, gm: fx.GraphModule, node: fx.Node, site: str, packed: Any,
                          arguments: Callable[[dict[str, fx.Node]], tuple]) -> fx.Node:
        """Store `packed`'s buffers (values, block_cols, row_nnz, scales when INT8) as attributes of
        the site, replace `node` by a call of `torch_op()` on `arguments(getters)` (the buffers'
        get_attr nodes by part), and drop the dense weight. Returns the call."""
        tensors = {part: torch.from_numpy(getattr(packed, part)) for part in ("values", "block_cols", "row_nnz")}
        if packed.scales is not None:
            tensors["scales"] = torch.from_numpy(packed.scales)
        graph = gm.graph
        with graph.inserting_before(node):
            getters = {}
            for part, value in tensors.items():
                target = packed_name(site, part)
                set_attr_tensor(gm, target, value.contiguous(), parameter=False)
                getters[part] = graph.get_attr(target)
                set_node_info(getters[part], ROLE_WEIGHT, site, part)
            call = graph.call_function(self.torch_op(), arguments(getters))
        call.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
        set_node_info(call, ROLE_SITE_OP, site, self.name)
        node.replace_all_uses_with(call)
        weight_nodes = [n for n in node.all_input_nodes if n.op == "get_attr" and n.target == site]
        graph.erase_node(node)
        for getter in weight_nodes:
            if not getter.users:
                graph.erase_node(getter)
        del_attr(gm, site)
        return call

    def lowered_call(self, gm: fx.GraphModule, plan: LayerPlan) -> tuple[fx.Node | None, str]:
        """The one call of `torch_op()` computing the plan's site, and what is wrong with its packed
        buffers against its N (args[6]) and K (args[7]) ('' when nothing)."""
        calls = [n for n in self.calls(gm) if (info := node_info(n)) is not None and info.site == plan.site]
        if len(calls) != 1:
            return None, f"lowered but {len(calls)} {self.name} calls compute it (expected one)"
        node = calls[0]
        values, cols, nnz = (get_attr_value(gm, str(a.target)) for a in node.args[1:4])  # type: ignore[union-attr]
        n_out, k_in = node.args[6], node.args[7]
        r, s, br, bc = values.shape
        if (r != -(-n_out // br) or tuple(cols.shape) != (r, s) or tuple(nnz.shape) != (r,)  # type: ignore[operator]
                or cols.dtype != torch.int64 or (cols.numel() and int(cols.max()) * bc >= k_in)):  # type: ignore[operator]
            return node, (f"packed blocks are inconsistent: values {tuple(values.shape)}, block_cols "
                          f"{tuple(cols.shape)}, row_nnz {tuple(nnz.shape)} for a [{n_out}, {k_in}] weight")
        return node, ""

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
