"""The block-sparse linear target: linear, addmm and matmul-with-parameter sites become
`sparsec::block_sparse_linear` (PyTorch) and `sparsec::BlockSparseLinear` (ONNX).

    match    a linear(x, W, b), an addmm(b, x, W) with a bias vector (GPT-2's Conv1D, W stored
             [in, out]: packed transposed) or a matmul(x, W) whose right operand is the weight
    check    W is a float32 matrix, addmm has alpha = beta = 1
    pack     padded blocked-ELL (sparsec.lowering.block_format), fp32 blocks, or INT8 blocks with
             one scale per output row computed in INT8 (the node's compute="int8")
    torch op sparsec.lowering.torch_op.block_sparse_linear (runs in PyTorch: a lowered program
             can be compared with the dense one)
    ONNX     one BlockSparseLinear node (sparsec.lowering.onnx_op.translate) with a model-local
             function body per variant (onnx_op.function_proto)
    verify   the packed buffers agree with each other and with the call's N and K
    cost     sparsec.lowering.cost: the kept blocks' share of the dense work at the kernel's
             measured efficiency for the block
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from sparsec.ir import LayerPlan, get_attr_value
from sparsec.lowering import block_format, cost, onnx_op, torch_op
from sparsec.lowering.targets.base import LoweringTarget
from sparsec.site import Site
from sparsec.site_ops import site_operand


class BlockSparseLinearTarget(LoweringTarget):
    name = "block_sparse_linear"
    kinds = ("linear", "addmm", "matmul")

    def torch_op(self) -> Any:
        return torch_op.op()

    # ---------------------------------------------------------------- match, check and cost
    def plan(self, gm: fx.GraphModule, node: fx.Node, site: Site,
             block: tuple[int, int] | None = None) -> LayerPlan:
        found = site_operand(node, gm)
        kind = found[0] if found else site.op
        weight = get_attr_value(gm, site.name)
        reason = self._unsupported(gm, node, kind, found, weight)
        if reason:
            return LayerPlan(site.name, kind, False, reason, target=self.name)
        transposed = kind in ("addmm", "matmul")
        matrix = weight.detach().t() if transposed else weight.detach()
        block = block or ((site.block[1], site.block[0]) if transposed else site.block)
        stats = cost.block_stats(matrix, block)
        facts = (f"{stats.work:.1%} of the dense work: {stats.kept_blocks}/"
                 f"{stats.grid[0] * stats.grid[1]} blocks of {block[0]}x{block[1]}, "
                 f"up to {stats.max_per_row} per block row")
        return LayerPlan(site.name, kind, True, facts, self.name, transposed, block, stats,
                         cost.estimated_speedup(stats))

    def _unsupported(self, gm: fx.GraphModule, node: fx.Node, kind: str,
                     found: tuple[str, int] | None, weight: torch.Tensor) -> str:
        """Why this site's op cannot become a block_sparse_linear ('' when it can)."""
        if found is None:
            return f"op {node.target} is not a linear, addmm or matmul"
        reason = self.is_float_matrix(weight)
        if reason:
            return reason
        if kind == "matmul" and found[1] != 1:
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

    # ------------------------------------------------------------------------ pack and call
    def lower(self, gm: fx.GraphModule, node: fx.Node, plan: LayerPlan, int8: bool = False) -> fx.Node:
        weight = get_attr_value(gm, plan.site).detach()
        matrix = weight.t().contiguous() if plan.transposed else weight
        assert plan.block is not None
        packed = block_format.pack(matrix, block=plan.block, int8=int8, per_row=int8)
        x, bias = _operands(node, plan.op)
        return self.replace_with_call(gm, node, plan.site, packed, lambda get: (
            x, get["values"], get["block_cols"], get["row_nnz"], bias, get.get("scales"),
            int(matrix.shape[0]), int(matrix.shape[1]), bool(int8)))

    # --------------------------------------------------------------------------- verify
    def check_lowered(self, gm: fx.GraphModule, plan: LayerPlan) -> str:
        return self.lowered_call(gm, plan)[1]

    # ----------------------------------------------------------------------------- ONNX
    def onnx_translation(self) -> dict:
        return {self.torch_op(): onnx_op.translate}

    def onnx_nodes(self, graph: Any) -> list[Any]:
        return onnx_op.sparse_nodes(graph)

    def check_onnx(self, node: Any, attached: bool) -> str:
        return self.check_packed_node(node, onnx_op.INPUTS, onnx_op.Variant, attached)

    def attach_functions(self, model: Any) -> int:
        onnx_op.attach_functions(model)
        return len(self.onnx_nodes(model))


def _operands(node: fx.Node, op: str) -> tuple[fx.Node, fx.Node | None]:
    """(input, bias) of a linear(x, W, b), addmm(b, x, W) or matmul(x, W) node."""
    if op == "linear":
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], bias  # type: ignore[return-value]
    if op == "addmm":
        return node.args[1], node.args[0]  # type: ignore[return-value]
    return node.args[0], None  # type: ignore[return-value]
