"""The block-sparse convolution target: a conv2d site becomes a block-sparse linear over its
unfolded input (im2col), computed by the block-sparse linear op (sparsec's kernel, or the
function body on stock onnxruntime).

A convolution weight [O, C, kh, kw] is masked as the matrix [O, C*kh*kw] (sparsec.blocks), which
is also how an im2col product reads it: output pixel (n, y, x) is W2d @ col(n, y, x), with col the
C*kh*kw input values under the kernel, channel-major then kernel row and column (F.unfold's order).

    1x1, stride 1, no padding   x [N, C, H, W] -> permute to [N, H, W, C] -> linear -> permute back
    kxk (stride, padding, dilation)   x -> pad -> kh*kw strided slices, stacked and flattened to
                                [N, C*kh*kw, H', W'] -> the same permutes around the linear

Everything around the linear is standard ops (Pad, Slice, Concat, Reshape, Transpose in ONNX), so
the file runs on stock onnxruntime too. The linear itself is lowered by the block-sparse linear
target (packing, INT8, verification, ONNX node and function body are its own).

    match    conv2d(x, W, b, stride, padding, dilation, groups=1) with integer padding
    check    W is float32 and 4-D; the input is [N, C, H, W]; groups = 1; stride, padding and
             dilation are integers
    cost     none: the unfold's copies in onnxruntime ops cost more than the sparse product saves
             (3x3 64->64 on 56x56 at density 0.1: 0.09x of onnxruntime's Conv; 1x1 256->64: 1.2x;
             docs/BENCHMARKS.md), so convolutions are lowered only with policy = always, for a
             smaller file. A fast form needs an implicit-GEMM kernel.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from sparsec.ir import LayerPlan, get_attr_value, set_attr_tensor
from sparsec.lowering import cost
from sparsec.lowering.targets.base import LoweringTarget
from sparsec.lowering.targets.linear import BlockSparseLinearTarget
from sparsec.site import Site
from sparsec.site_ops import site_operand

aten = torch.ops.aten
_CONV2D = (aten.conv2d.default, torch.nn.functional.conv2d)
_END = 2 ** 62   # a slice to the end


def _pair(value: Any, default: int) -> tuple[int, int] | None:
    if value is None:
        return default, default
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        if len(value) == 1:
            return value[0], value[0]
        if len(value) == 2:
            return value[0], value[1]
    return None


def conv_args(node: fx.Node) -> dict[str, Any]:
    """The conv2d node's operands by name (positional or keyword)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    found = dict(zip(names, node.args))
    found.update({k: v for k, v in node.kwargs.items() if k in names})
    return found


class BlockSparseConvTarget(LoweringTarget):
    name = "block_sparse_conv"
    kinds = ("conv",)

    def __init__(self) -> None:
        self.linear = BlockSparseLinearTarget()

    def torch_op(self) -> Any:
        return self.linear.torch_op()

    # ---------------------------------------------------------------- match, check and cost
    def plan(self, gm: fx.GraphModule, node: fx.Node, site: Site,
             block: tuple[int, int] | None = None) -> LayerPlan:
        weight = get_attr_value(gm, site.name)
        reason = self._unsupported(gm, node, weight)
        if reason:
            return LayerPlan(site.name, "conv", False, reason, target=self.name)
        matrix = weight.detach().reshape(weight.shape[0], -1)
        block = block or site.block
        stats = cost.block_stats(matrix, block)
        kh, kw = weight.shape[2:]
        facts = (f"{stats.work:.1%} of the dense work: {stats.kept_blocks}/"
                 f"{stats.grid[0] * stats.grid[1]} blocks of {block[0]}x{block[1]} over "
                 f"[{matrix.shape[0]}, {matrix.shape[1]}] ({kh}x{kw} kernel unfolded)")
        # No speed estimate: around the linear, the unfold is data movement in onnxruntime ops that
        # the linear's cost model does not see (measured: docs/BENCHMARKS.md), so a convolution
        # is lowered only on request (policy = always), for the smaller file.
        return LayerPlan(site.name, "conv", True, facts, self.name, False, block, stats, None)

    def _unsupported(self, gm: fx.GraphModule, node: fx.Node, weight: torch.Tensor) -> str:
        if node.target not in _CONV2D or site_operand(node, gm) is None:
            return f"op {node.target} is not a 2-D convolution (conv1d/conv3d stay dense)"
        if weight.dim() != 4 or weight.dtype != torch.float32:
            return f"weight is {weight.dtype} with {weight.dim()} dimensions; the op takes float32 [O, C, kh, kw]"
        args = conv_args(node)
        image = args["input"].meta.get("val") if isinstance(args.get("input"), fx.Node) else None
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            return "the input is not known to be a batch of images [N, C, H, W]: stays dense"
        if args.get("groups", 1) != 1:
            return f"grouped convolution (groups = {args.get('groups')}): stays dense"
        for key, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            if _pair(args.get(key), default) is None:
                return f"{key} {args.get(key)!r} is not one or two integers: stays dense"
        return ""

    # ------------------------------------------------------------------------ rewrite
    def lower(self, gm: fx.GraphModule, node: fx.Node, plan: LayerPlan, int8: bool = False) -> fx.Node:
        weight = get_attr_value(gm, plan.site).detach()
        o, c, kh, kw = weight.shape
        args = conv_args(node)
        x, bias = args["input"], args.get("bias")
        stride, padding, dilation = (_pair(args.get(k), d) for k, d in
                                     (("stride", 1), ("padding", 0), ("dilation", 1)))
        pointwise = (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0)
        graph = gm.graph
        weight_getters = [n for n in node.all_input_nodes if n.op == "get_attr" and n.target == plan.site]
        # the site's weight becomes the [O, C*kh*kw] matrix the linear target packs
        set_attr_tensor(gm, plan.site, torch.nn.Parameter(weight.reshape(o, c * kh * kw).contiguous(),
                                                           requires_grad=False), parameter=True)
        with graph.inserting_before(node):
            pixels = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))      # [N, H, W, C]
            rows = pixels if pointwise else self._unfold(graph, pixels, (kh, kw), stride, padding, dilation)
            matrix = graph.get_attr(plan.site)
            linear = graph.call_function(aten.linear.default, (rows, matrix, bias))
            linear.meta.update({k: v for k, v in node.meta.items() if k in ("stack_trace", "nn_module_stack")})
            out = graph.call_function(aten.permute.default, (linear, [0, 3, 1, 2]))    # [N, O, H', W']
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        for getter in weight_getters:
            if not getter.users:
                graph.erase_node(getter)
        return self.linear.lower(gm, linear, dataclasses.replace(plan, op="linear", target=self.linear.name),
                                 int8=int8)

    @staticmethod
    def _unfold(graph: fx.Graph, pixels: fx.Node, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int]) -> fx.Node:
        """[N, H', W', C*kh*kw] from channels-last pixels [N, H, W, C], in F.unfold's column order
        (channel-major, then kernel row and column): one strided slice of the padded input per
        kernel position, stacked on a new last axis. Tap (i, j) starts at (i*dh, j*dw) and stops
        (kh-1-i)*dh rows before the end, which leaves exactly H' = (H + 2ph - dh(kh-1) - 1) // sh + 1
        rows whatever H is (dynamic sizes work)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        if ph or pw:
            pixels = graph.call_function(aten.constant_pad_nd.default, (pixels, [0, 0, pw, pw, ph, ph], 0.0))
        taps = []
        for i in range(kh):
            for j in range(kw):
                bottom, right = (kh - 1 - i) * dh, (kw - 1 - j) * dw
                rows = graph.call_function(aten.slice.Tensor, (pixels, 1, i * dh, -bottom if bottom else _END, sh))
                taps.append(graph.call_function(aten.slice.Tensor, (rows, 2, j * dw, -right if right else _END, sw)))
        stacked = graph.call_function(aten.stack.default, (taps, 4))             # [N, H', W', C, kh*kw]
        return graph.call_function(aten.flatten.using_ints, (stacked, 3, 4))

    # --------------------------------------------------------------------------- verify
    def check_lowered(self, gm: fx.GraphModule, plan: LayerPlan) -> str:
        return self.linear.check_lowered(gm, plan)
