"""Which graph ops consume a sparsity site's weight, and where: shared by find_sites (which records
sites), the lowering targets (which rewrite them) and the verifier."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsec.ir import get_attr_value

aten = torch.ops.aten
F = torch.nn.functional

# op -> (kind, positions where the weight may be)
SITE_OPS: dict[object, tuple[str, tuple[int, ...]]] = {
    aten.linear.default: ("linear", (1,)),
    F.linear: ("linear", (1,)),
    aten.conv1d.default: ("conv", (1,)),
    aten.conv2d.default: ("conv", (1,)),
    aten.conv3d.default: ("conv", (1,)),
    aten.conv1d.padding: ("conv", (1,)),      # padding="same" or "valid"
    aten.conv2d.padding: ("conv", (1,)),
    aten.conv3d.padding: ("conv", (1,)),
    F.conv1d: ("conv", (1,)),
    F.conv2d: ("conv", (1,)),
    F.conv3d: ("conv", (1,)),
    aten.addmm.default: ("addmm", (2,)),
    torch.addmm: ("addmm", (2,)),
    aten.mm.default: ("matmul", (0, 1)),
    aten.matmul.default: ("matmul", (0, 1)),
    torch.matmul: ("matmul", (0, 1)),
    torch.mm: ("matmul", (0, 1)),
    operator.matmul: ("matmul", (0, 1)),
}


def site_operand(node: fx.Node, gm: fx.GraphModule) -> tuple[str, int] | None:
    """(kind, argument index) when `node` consumes a parameter as its weight operand."""
    if node.op != "call_function" or node.target not in SITE_OPS:
        return None
    kind, positions = SITE_OPS[node.target]
    for pos in positions:
        if pos < len(node.args) and is_parameter(node.args[pos], gm):
            return kind, pos
    return None


def is_parameter(arg: object, gm: fx.GraphModule) -> bool:
    """A get_attr node of a parameter with two or more dimensions."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return False
    value = get_attr_value(gm, str(arg.target))
    return isinstance(value, torch.nn.Parameter) and value.dim() >= 2


def site_node(gm: fx.GraphModule, name: str) -> tuple[fx.Node | None, str]:
    """The op node consuming site `name`'s weight, or None and why not."""
    weights = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    users = [u for w in weights for u in w.users]
    if len(users) != 1:
        return None, f"weight has {len(users)} uses; lowering needs exactly one"
    return users[0], ""
