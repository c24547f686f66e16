"""sparsec's IR: a torch.fx GraphModule plus typed sparsec metadata.

This module is the contract between the passes, the Program and the lowering: every fact a pass
records and every name it gives a buffer or a node is defined here, so no other module needs to
import a pass to read what the pass wrote.

All of sparsec's facts live under one key, `"sparsec"`: on the GraphModule (`gm.meta`) a
`GraphInfo`, on nodes (`node.meta`) a `NodeInfo`. Read and write them only through the accessors
below, so the layout can change in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.fx as fx

from sparsec.lowering.cost import BlockStats
from sparsec.methods.base import Method
from sparsec.shapes import DynamicDims
from sparsec.site import Site
from sparsec.spec.model import ScheduleSpec

__all__ = ["KEY", "Site", "NodeInfo", "GroupPlan", "LayerPlan", "TrainingTables", "GraphInfo",
           "graph_info", "node_info", "set_node_info", "nodes_with_role", "get_attr_value",
           "set_attr_tensor", "del_attr", "mask_name", "scores_name", "state_name", "gate_name",
           "packed_name", "format_ir"]

KEY = "sparsec"

# Roles a node can play in the rewritten graph.
ROLE_WEIGHT = "weight"             # get_attr of a site's weight (or of its packed blocks)
ROLE_MASK = "mask"                 # get_attr of a site's mask buffer
ROLE_SCORES = "scores"             # get_attr of a site's learned scores
ROLE_MASKED_WEIGHT = "masked_weight"  # W_eff = mask op(W, M, ...)
ROLE_SITE_OP = "site_op"           # the linear / conv / matmul that consumes the weight
ROLE_MODE = "mode"                 # a train/eval-dependent op made mode-aware
ROLES = (ROLE_WEIGHT, ROLE_MASK, ROLE_SCORES, ROLE_MASKED_WEIGHT, ROLE_SITE_OP, ROLE_MODE)


# ------------------------------------------------------------------------------------- names
# Buffers and parameters a pass adds live on the submodule that owns the site's weight, named
# after the weight: `fc1.weight` -> `fc1.weight_mask`, `fc1.weight_scores`, `fc1.weight_ema`.

def mask_name(site: str) -> str:
    """The mask buffer of a site (`fc1.weight_mask`), shaped like the weight."""
    return f"{site}_mask"


def scores_name(site: str) -> str:
    """The learned scores of a site (`fc1.weight_scores`), one per block."""
    return f"{site}_scores"


def state_name(site: str, key: str) -> str:
    """The buffer holding a method's per-site state `key` (e.g. `fc1.weight_ema`)."""
    return f"{site}_{key}"


def gate_name(site: str) -> str:
    """The submodule a call_module mask node calls (e.g. `fc1.weight_gate`)."""
    return f"{site}_gate"


def packed_name(site: str, part: str) -> str:
    """A packed tensor of a lowered site (`fc1.weight_values`, `fc1.weight_block_cols`, ...)."""
    return f"{site}_{part}"


# ------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class NodeInfo:
    """sparsec's facts about one node."""

    role: str
    site: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class GroupPlan:
    """What the Program does for one [[prune]] group at each step (attach_schedule)."""

    index: int
    method: str
    density: float
    scope: str
    sites: tuple[str, ...]


@dataclass(frozen=True)
class LayerPlan:
    """What lowering does with one site, and why (choose_sparse_layers)."""

    site: str
    op: str                                   # linear | addmm | matmul | conv
    lower: bool
    reason: str
    target: str = ""                          # the lowering target that rewrites it
    transposed: bool = False                  # the weight is stored [K, N]
    block: tuple[int, int] | None = None      # BR, BC of the [N, K] matrix
    stats: BlockStats | None = None
    speedup: float | None = None              # the cost model's estimate
    runtime: str = ""                         # the runtime decided for: sparsec | stock
    rows: int | None = None                   # rows of X in the example inputs (what was timed)
    measured: Any = None                      # a sparsec.lowering.calibrate.Measurement, or None
    basis: str = ""                           # "measured ..." or "estimated, not measured (why)"
    # convolutions: [kh, kw, sh, sw, pt, pl, pb, pr, dh, dw] then, when the example inputs say, the
    # input image [B, C, H, W] (what is timed at export)
    conv: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"site": self.site, "op": self.op, "lowered": self.lower, "reason": self.reason,
               "target": self.target, "transposed": self.transposed, "speedup_estimate": self.speedup,
               "runtime": self.runtime, "rows": self.rows, "basis": self.basis,
               "measured": self.measured.to_dict() if self.measured is not None else None}
        if self.conv is not None:
            out["conv"] = list(self.conv)
        if self.stats is not None:
            s = self.stats
            out.update(shape=list(s.shape), block=list(s.block), block_density=s.block_density,
                       stored=s.stored, blocks_per_row=s.max_per_row)
        return out


@dataclass(frozen=True)
class TrainingTables:
    """The spec's training-time tables attached to the IR: `[distill]` and `[self_regularization]`
    as resolved dicts (None when the spec has no such table)."""

    distill: Mapping[str, Any] | None = None
    self_regularization: Mapping[str, Any] | None = None


@dataclass
class GraphInfo:
    """sparsec's facts about the whole graph; each field names the pass that fills it."""

    facts: set[str] = field(default_factory=set)       # postconditions established so far
    capture: str = ""                                   # capture: torch.export | torch.fx.symbolic_trace
    dynamic: DynamicDims | None = None                  # capture: the inputs' dynamic dimensions
    candidates: dict[str, Site] = field(default_factory=dict)  # find_sites: every site found
    left_out: dict[str, str] = field(default_factory=dict)     # find/select_sites: parameter -> why not
    sites: dict[str, Site] = field(default_factory=dict)       # select_sites: chosen, in graph order
    methods: dict[int, Method] = field(default_factory=dict)   # insert_masks: group -> its Method
    schedule: ScheduleSpec | None = None                       # attach_schedule
    groups: tuple[GroupPlan, ...] = ()                         # attach_schedule
    training: TrainingTables = field(default_factory=TrainingTables)  # attach_schedule
    lowering: dict[str, LayerPlan] = field(default_factory=dict)      # choose_sparse_layers

    def lowered_sites(self) -> list[str]:
        """Sites that lower_block_sparse rewrote (empty before it ran)."""
        if "lowered" not in self.facts:
            return []
        return [name for name, plan in self.lowering.items() if plan.lower]


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


# ------------------------------------------------------------------------------- attributes
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


# ------------------------------------------------------------------------------------- text
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
            + (" balanced" if site.balanced else "")
        )
    for plan in info.lowering.values():
        verdict = f"lowered by {plan.target}" if plan.lower else "stays dense"
        lines.append(f"# lowering {plan.site}: {verdict} ({plan.reason})")
    for node in nodes_with_role(gm, ROLE_MODE):
        lines.append(f"# {node.name}: follows the train/eval mode ({node_info(node).detail})")  # type: ignore[union-attr]
    code = gm.code.strip("\n")
    return "\n".join(lines) + "\n\n" + code + "\n"


def source_line(node: fx.Node) -> str:
    """`file:line` of the user code that produced `node`, from the capture's stack trace: the
    innermost frame outside torch and sparsec (the model's line, not torch.nn.Linear.forward's)."""
    from sparsec.paths import is_library_file

    trace = node.meta.get("stack_trace") or ""
    frames = []
    for line in trace.strip().splitlines():
        line = line.strip()
        if not line.startswith("File "):
            continue
        try:
            filename = line.split('"')[1]
            lineno = line.split("line ")[1].split(",")[0]
        except IndexError:
            continue
        frames.append((filename, lineno))
    if not frames:
        return ""
    user = [f for f in frames if not is_library_file(f[0])]
    filename, lineno = (user or frames)[-1]
    return f"{filename}:{lineno}"
