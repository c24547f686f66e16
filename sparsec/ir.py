"""sparsec's IR: a torch.fx GraphModule plus typed sparsec metadata.

All of sparsec's facts live under one key, `"sparsec"`: on the GraphModule (`gm.meta`) a
`GraphInfo`, on nodes (`node.meta`) a `NodeInfo`. Read and write them only through the accessors
below, so the layout can change in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx

KEY = "sparsec"

# Roles a node can play in the rewritten graph.
ROLE_WEIGHT = "weight"             # get_attr of a site's weight
ROLE_MASK = "mask"                 # get_attr of a site's mask buffer
ROLE_SCORES = "scores"             # get_attr of a site's learned scores
ROLE_MASKED_WEIGHT = "masked_weight"  # W_eff = mask op(W, M, ...)
ROLE_SITE_OP = "site_op"           # the linear / conv / matmul that consumes the weight
ROLE_MODE = "mode"                 # a train/eval-dependent op made mode-aware
ROLES = (ROLE_WEIGHT, ROLE_MASK, ROLE_SCORES, ROLE_MASKED_WEIGHT, ROLE_SITE_OP, ROLE_MODE)


@dataclass(frozen=True)
class Site:
    """A sparsity site: the weight operand of a linear, convolution or matmul-with-parameter node.

    `name` is the parameter's name in `model.named_parameters()`. Block geometry refers to the
    weight's matrix view (see sparsec.blocks). Fields after `source` are filled by select_sites.
    """

    name: str
    shape: tuple[int, ...]
    op: str                      # linear | conv | addmm | matmul
    source: str = ""             # the user's source line of the consuming op, when known
    group: int | None = None     # index into the spec's [[prune]] list
    method: str | None = None
    density: float | None = None  # final density asked for this site's group
    scope: str | None = None
    block: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # rows / cols missing from the last partial block

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class NodeInfo:
    """sparsec's facts about one node."""

    role: str
    site: str | None = None
    detail: str = ""


@dataclass
class GraphInfo:
    """sparsec's facts about the whole graph."""

    facts: set[str] = field(default_factory=set)       # postconditions established so far
    capture: str = ""                                   # export | symbolic_trace
    candidates: dict[str, Site] = field(default_factory=dict)  # every site found
    left_out: dict[str, str] = field(default_factory=dict)     # parameter -> why not a site / not selected
    sites: dict[str, Site] = field(default_factory=dict)       # selected sites, in graph order
    attached: dict[str, Any] = field(default_factory=dict)     # schedule, groups, regularizers


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    """The GraphInfo of `gm`, created empty on first access."""
    info = gm.meta.get(KEY)
    if info is None:
        info = gm.meta[KEY] = GraphInfo()
    return info


def node_info(node: fx.Node) -> NodeInfo | None:
    return node.meta.get(KEY)


def set_node_info(node: fx.Node, role: str, site: str | None = None, detail: str = "") -> None:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    node.meta[KEY] = NodeInfo(role, site, detail)


def nodes_with_role(gm: fx.GraphModule, role: str) -> Iterator[fx.Node]:
    for node in gm.graph.nodes:
        info = node_info(node)
        if info is not None and info.role == role:
            yield node


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    """The object a get_attr node with `target` refers to."""
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def set_attr_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor, parameter: bool) -> None:
    """Register `value` as parameter or buffer `target` (dotted) on its owning submodule."""
    owner_name, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if parameter:
        owner.register_parameter(leaf, value if isinstance(value, torch.nn.Parameter)
                                 else torch.nn.Parameter(value))
    else:
        owner.register_buffer(leaf, value)


def del_attr(gm: fx.GraphModule, target: str) -> None:
    owner_name, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    delattr(owner, leaf)


def format_ir(gm: fx.GraphModule, title: str = "") -> str:
    """The IR as text: a header with sparsec's facts and sites, then the graph as Python code."""
    info = graph_info(gm)
    lines = [f"# sparsec IR{(' after ' + title) if title else ''}"]
    if info.capture:
        lines.append(f"# captured with: {info.capture}")
    if info.facts:
        lines.append("# facts: " + ", ".join(sorted(info.facts)))
    for site in info.sites.values():
        lines.append(
            f"# site {site.name}: shape={list(site.shape)} op={site.op} group={site.group} "
            f"method={site.method} density={site.density} scope={site.scope} "
            f"block={list(site.block)} padding={list(site.padding)}"
        )
    for node in nodes_with_role(gm, ROLE_MODE):
        lines.append(f"# {node.name}: follows the train/eval mode ({node_info(node).detail})")  # type: ignore[union-attr]
    code = gm.code.strip("\n")
    return "\n".join(lines) + "\n\n" + code + "\n"
