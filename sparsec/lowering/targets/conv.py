"""The block-sparse convolution target: a conv2d site becomes `sparsec::block_sparse_conv2d`
(PyTorch) and `sparsec::BlockSparseConv` (ONNX), computed directly on the image by sparsec's kernel
(sparsec/runtime/kernel/block_sparse_conv.cc), or by its function body on stock onnxruntime.

A convolution weight [O, C, kh, kw] is masked as the matrix [O, C*kh*kw] (sparsec.blocks), and
packed so: output pixel (n, y, x) is W2d @ col(n, y, x), with col the C*kh*kw input values under
the kernel, channel-major then kernel row and column (F.unfold's order).

    match    conv2d(x, W, b, stride, padding, dilation, groups=1), padding integers, "same" or "valid"
    check    W is float32 and 4-D; the input is [N, C, H, W]; groups = 1; stride, padding and
             dilation are integers
    pack     padded blocked-ELL of the [O, C*kh*kw] matrix (sparsec.lowering.block_format): fp32
             blocks, or INT8 blocks with one scale per block, dequantized by the kernel when it
             packs them (the arithmetic stays fp32: the kernel has no INT8 convolution)
    torch op sparsec.lowering.conv_op.block_sparse_conv2d (patches times the kept blocks)
    ONNX     one BlockSparseConv node; its function body rebuilds the dense weight from the blocks
             (constant-folded by onnxruntime at load) and runs onnxruntime's Conv: as fast as the
             dense file on stock onnxruntime, the file as small as the kept blocks
    cost     the kept blocks' share of the dense work at the kernel's measured efficiency for
             convolutions (sparsec.lowering.cost.conv_efficiency), measured at export on the
             layer's geometry and image size (sparsec.lowering.calibrate) when possible
    epilogue a following Relu is folded into the node (the fuse_epilogues pass)
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from sparsec.ir import LayerPlan, get_attr_value
from sparsec.lowering import block_format, conv_op, cost
from sparsec.lowering.targets.base import LoweringTarget
from sparsec.site import Site
from sparsec.site_ops import site_operand

aten = torch.ops.aten
_CONV2D = (aten.conv2d.default, aten.conv2d.padding, torch.nn.functional.conv2d)


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


def geometry(node: fx.Node, weight: torch.Tensor) -> list[int]:
    """[kh, kw, sh, sw, pt, pl, pb, pr, dh, dw] of a conv2d node (checked by `_unsupported`).
    padding="same" pads d*(k-1) in all, the odd one at the bottom and right, as PyTorch does."""
    args = conv_args(node)
    (sh, sw), (dh, dw) = (_pair(args.get(k), d) for k, d in (("stride", 1), ("dilation", 1)))  # type: ignore[misc]
    kh, kw = (int(v) for v in weight.shape[2:])
    padding = args.get("padding")
    if padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return [kh, kw, sh, sw, th // 2, tw // 2, th - th // 2, tw - tw // 2, dh, dw]
    ph, pw = (0, 0) if padding == "valid" else _pair(padding, 0)  # type: ignore[misc]
    return [kh, kw, sh, sw, ph, pw, ph, pw, dh, dw]


def image_shape(node: fx.Node) -> tuple[int, int, int, int] | None:
    """[B, C, H, W] of the conv's input in the example inputs, when every size is known."""
    value = conv_args(node).get("input")
    value = value.meta.get("val") if isinstance(value, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return None
    dims = [d if isinstance(d, int) else getattr(getattr(d, "node", None), "hint", None) for d in value.shape]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


class BlockSparseConvTarget(LoweringTarget):
    name = "block_sparse_conv"
    kinds = ("conv",)

    def torch_op(self) -> Any:
        return conv_op.torch_op()

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
        geo = geometry(node, weight)
        image = image_shape(node)
        facts = (f"{stats.work:.1%} of the dense work: {stats.kept_blocks}/"
                 f"{stats.grid[0] * stats.grid[1]} blocks of {block[0]}x{block[1]} over "
                 f"[{matrix.shape[0]}, {matrix.shape[1]}] ({geo[0]}x{geo[1]} kernel unfolded)")
        pointwise = cost.pointwise(geo)
        return LayerPlan(site.name, "conv", True, facts, self.name, False, block, stats,
                         cost.estimated_speedup_conv(stats, pointwise),
                         conv=(*geo, *image) if image is not None else tuple(geo))

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
            if key == "padding" and args.get(key) in ("same", "valid"):
                continue
            if _pair(args.get(key), default) is None:
                return f"{key} {args.get(key)!r} is not one or two integers: stays dense"
        return ""

    # ------------------------------------------------------------------------ pack and call
    def lower(self, gm: fx.GraphModule, node: fx.Node, plan: LayerPlan, int8: bool = False) -> fx.Node:
        weight = get_attr_value(gm, plan.site).detach()
        o = weight.shape[0]
        matrix = weight.reshape(o, -1).contiguous()
        assert plan.block is not None
        # INT8: int8 blocks with one scale per block, dequantized when the kernel packs them
        packed = block_format.pack(matrix, block=plan.block, int8=int8, per_row=False)
        args = conv_args(node)
        return self.replace_with_call(gm, node, plan.site, packed, lambda get: (
            args["input"], get["values"], get["block_cols"], get["row_nnz"], args.get("bias"), get.get("scales"),
            int(o), int(matrix.shape[1]), geometry(node, weight), ""))

    # --------------------------------------------------------------------------- verify
    def check_lowered(self, gm: fx.GraphModule, plan: LayerPlan) -> str:
        node, problem = self.lowered_call(gm, plan)
        if node is None or problem:
            return problem
        n_out, k_in, geo = node.args[6], node.args[7], node.args[8]
        if not isinstance(geo, list) or len(geo) != 10 or k_in % (geo[0] * geo[1]):  # type: ignore[operator]
            return f"geometry {geo!r} does not describe a [{n_out}, {k_in}] convolution weight"
        return ""

    # ----------------------------------------------------------------------------- ONNX
    def onnx_translation(self) -> dict:
        return {self.torch_op(): conv_op.translate}

    def onnx_nodes(self, graph: Any) -> list[Any]:
        return conv_op.conv_nodes(graph)

    def check_onnx(self, node: Any, attached: bool) -> str:
        k, shape = node.attributes.get("K"), node.attributes.get("kernel_shape")
        if shape is None or len(shape.as_ints()) != 2 or min(shape.as_ints()) < 1 or (
                k is not None and k.as_int() % (shape.as_ints()[0] * shape.as_ints()[1])):
            return "attribute kernel_shape must be [kh, kw] with K a multiple of kh*kw"
        for name, size in (("strides", 2), ("pads", 4), ("dilations", 2)):
            attr = node.attributes.get(name)
            if attr is not None and len(attr.as_ints()) != size:
                return f"attribute {name} must have {size} values"
        return self.check_packed_node(node, conv_op.INPUTS, conv_op.Variant, attached)

    def attach_functions(self, model: Any) -> int:
        conv_op.attach_functions(model)
        return len(self.onnx_nodes(model))
