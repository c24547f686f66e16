"""The rewritten graph as SVG (`sparsec inspect OUT --format svg`): graphviz lays it out when its
`dot` program is installed, otherwise a plain layered layout (networkx's topological generations,
drawn with matplotlib). Masks, scores, masked weights and the site ops that lowering turned into
block-sparse ops are coloured, with a legend.
"""
from __future__ import annotations

import shutil
import subprocess
from typing import Any

import networkx as nx

from sparsec.errors import UserError
from sparsec.htmlreport.plots import pyplot, styled, to_svg
from sparsec.inspection import ROLE_SPARSE_OP, to_dot
from sparsec.ir import ROLE_MASK, ROLE_MASKED_WEIGHT, ROLE_SCORES, ROLE_SITE_OP
from sparsec.text import escaped

COLOURS = {ROLE_MASK: "#f4a582", ROLE_SCORES: "#92c5de", ROLE_MASKED_WEIGHT: "#fddbc7",
           ROLE_SPARSE_OP: "#5aae61", ROLE_SITE_OP: "#d9f0d3"}
LEGEND = {ROLE_MASK: "mask", ROLE_SCORES: "scores", ROLE_MASKED_WEIGHT: "masked weight",
          ROLE_SPARSE_OP: "lowered to a block-sparse op", ROLE_SITE_OP: "site op, kept dense"}


def mark_sparse_ops(graph: nx.DiGraph, lowering: dict[str, Any] | None) -> nx.DiGraph:
    """A copy of `graph` whose site ops of lowered sites have the role `sparse_op`."""
    lowered = {layer.get("site") for layer in (lowering or {}).get("layers", []) if layer.get("lowered")}
    marked = graph.copy()
    for _, data in marked.nodes(data=True):
        if data.get("role") == ROLE_SITE_OP and data.get("site") in lowered:
            data["role"] = ROLE_SPARSE_OP
    return marked


def graph_svg(graph: nx.DiGraph, name: str = "sparsec", layout: str = "auto") -> str:
    """SVG text of `graph`; `layout` is "dot" (graphviz, must be installed), "layered" or "auto"
    (dot when installed)."""
    dot = shutil.which("dot")
    if layout == "dot" and dot is None:
        raise UserError("graphviz's dot is not installed (apt-get install graphviz), or use the layered layout")
    if layout in ("dot", "auto") and dot is not None:
        return _with_dot(dot, graph, name)
    return styled(_layered)(graph)


def _with_dot(dot: str, graph: nx.DiGraph, name: str) -> str:
    text = to_dot(graph, name)
    legend = "\n".join(f'    "legend: {label}" [shape=box, style=filled, fillcolor="{COLOURS[role]}"];'
                       for role, label in LEGEND.items())
    text = text.rstrip().rstrip("}") + f"  subgraph cluster_legend {{\n    label=legend;\n{legend}\n  }}\n}}\n"
    try:
        done = subprocess.run([dot, "-Tsvg"], input=text, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise UserError("graphviz's dot took over 120 s to lay the graph out") from None
    if done.returncode != 0:
        raise UserError(f"graphviz's dot failed: {(done.stderr.strip().splitlines() or ['no message'])[0]}")
    return done.stdout[done.stdout.index("<svg"):]


def layers_of(graph: nx.DiGraph) -> dict[str, int]:
    """Node -> its row: the longest path from an input, except that what does not depend on an
    input (weights, masks, scores and the masked weights made of them) sits as late as its first
    user allows, next to where it is used rather than all in the first rows."""
    depth = {node: level for level, nodes in enumerate(nx.topological_generations(graph)) for node in nodes}
    inputs = [n for n, d in graph.nodes(data=True) if d.get("op") == "placeholder"]
    fed = set(inputs).union(*(nx.descendants(graph, n) for n in inputs)) if inputs else set()
    for node in reversed(list(nx.topological_sort(graph))):
        users = [depth[user] for user in graph.successors(node)]
        if node not in fed and users:
            depth[node] = min(users) - 1
    return depth


def positions_of(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """A plain layered layout: rows from `layers_of`, each row ordered by the mean position of
    the nodes' predecessors above (one barycentre sweep), one unit between neighbours."""
    depth = layers_of(graph)
    rows: dict[int, list[str]] = {}
    for node in nx.topological_sort(graph):
        rows.setdefault(depth[node], []).append(node)
    x: dict[str, float] = {}
    for level in sorted(rows):
        def centre(node: str) -> float:
            above = [x[p] for p in graph.predecessors(node) if p in x]
            return sum(above) / len(above) if above else 0.0
        row = sorted(rows[level], key=centre)
        x.update({node: i - (len(row) - 1) / 2 for i, node in enumerate(row)})
    return {node: (x[node], -float(depth[node])) for node in graph.nodes}


def _layered(graph: nx.DiGraph) -> str:
    if not nx.is_directed_acyclic_graph(graph):
        raise UserError("the graph record has a cycle; it cannot be laid out in layers")
    plt = pyplot()
    positions = positions_of(graph)
    xs, ys = [p[0] for p in positions.values()] or [0.0], [p[1] for p in positions.values()] or [0.0]
    fig, axis = plt.subplots(figsize=(max(6.0, 1.5 * (max(xs) - min(xs) + 1) + 2.5),
                                      max(3.0, 0.6 * (max(ys) - min(ys) + 1))))
    colours = [COLOURS.get(graph.nodes[n].get("role", ""), "#eeeeee") for n in graph.nodes]
    nx.draw_networkx_edges(graph, positions, ax=axis, arrows=True, arrowsize=8, edge_color="#999999",
                           width=0.6, node_size=900, node_shape="s")
    nx.draw_networkx_nodes(graph, positions, ax=axis, node_color=colours, node_shape="s", node_size=900,
                           edgecolors="#555555", linewidths=0.5)
    labels = {n: escaped(f"{_tail(n)}\n{_short(graph.nodes[n].get('target', ''))}") for n in graph.nodes}
    nx.draw_networkx_labels(graph, positions, labels=labels, ax=axis, font_size=6)
    for role, label in LEGEND.items():
        axis.scatter([], [], color=COLOURS[role], marker="s", label=label)
    axis.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    axis.set_axis_off()
    fig.tight_layout()
    return to_svg(fig)


def _tail(name: str, width: int = 22) -> str:
    """The end of a long node name (`...layer_0_attention_self_query_weight_mask` -> its last characters)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _short(target: str) -> str:
    return str(target).replace("aten::", "").split(".")[-1][:24]


def folder_svg(out: Any, layout: str = "auto") -> str:
    """The rewritten graph of an output folder (an inspection.OutputFolder) as SVG, with the sites
    its report says were lowered marked as block-sparse ops."""
    graph = mark_sparse_ops(out.graph(), out.report().get("lowering"))
    return graph_svg(graph, out.path.name, layout)
