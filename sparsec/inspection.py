"""`sparsec inspect OUT`: read back an output folder written by `sparsec compile`.

The IR after every pass is kept as text (`ir/NN_<pass>.py.txt`), the per-layer densities in
`report.json` and the rewritten graph's structure in `graph.json` (recorded at compile time with
`graph_record`), from which a networkx DiGraph is rebuilt to export as DOT or GraphML. Mask and
score nodes carry their sparsec role so that they stand out in the rendering.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch.fx as fx

from sparsec.errors import UserError
from sparsec.ir import ROLE_MASK, ROLE_MASKED_WEIGHT, ROLE_SCORES, ROLE_SITE_OP, node_info
from sparsec.report import format_layers

IR_DIR = "ir"
FX_SUFFIX = ".py.txt"       # the FX IR after capture and after each FX pass
ONNX_SUFFIX = ".onnx.txt"   # the ONNX IR after export and after each ONNX pass
MARKER = ".sparsec"  # the file sparsec writes into every output folder (sparsec.outdir)  # files that make a folder a sparsec output folder


# ------------------------------------------------------------------------- written at compile time
def graph_record(gm: fx.GraphModule) -> dict[str, Any]:
    """The graph's structure as JSON data: nodes with their sparsec role and site, and edges."""
    nodes, edges = [], []
    for node in gm.graph.nodes:
        info = node_info(node)
        nodes.append({"name": node.name, "op": node.op, "target": _target_name(node),
                      "role": info.role if info else "", "site": (info.site or "") if info else "",
                      "detail": info.detail if info else ""})
        edges += [[source.name, node.name] for source in node.all_input_nodes]
    return {"nodes": nodes, "edges": edges}


def _target_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def ir_file_name(index: int, stage: str, suffix: str = FX_SUFFIX) -> str:
    return f"{index:02d}_{stage}{suffix}"


def _stage_of(file: Path) -> str:
    name = file.name[len("00_"):]
    for suffix in (FX_SUFFIX, ONNX_SUFFIX):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


# ----------------------------------------------------------------------------- the output folder
@dataclass(frozen=True)
class OutputFolder:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "OutputFolder":
        folder = Path(path)
        if not folder.exists():
            raise UserError(f"{folder}: no such output folder (write one with sparsec compile)")
        if not folder.is_dir() or not (folder / MARKER).is_file() or not (folder / "report.json").is_file():
            raise UserError(f"{folder}: not a sparsec output folder (no {MARKER} marker or report.json); "
                            f"pass the folder that sparsec compile -o wrote")
        return cls(folder)

    def report(self) -> dict[str, Any]:
        report = _read_json(self.path / "report.json")
        keys = {"site", "shape", "block", "asked_density", "density", "kept", "parameters"}
        layers = report.get("layers", []) if isinstance(report, dict) else None
        if not isinstance(layers, list) or not all(isinstance(x, dict) and keys <= set(x) for x in layers):
            raise UserError(f"{self.path / 'report.json'}: is not a sparsec report")
        return report

    def snapshots(self, suffixes: tuple[str, ...] = (FX_SUFFIX, ONNX_SUFFIX)) -> dict[str, Path]:
        """Stage name -> IR file, in pipeline order (`captured` first); FX and ONNX by default."""
        files = sorted(f for f in (self.path / IR_DIR).glob("*.txt") if f.name.endswith(suffixes))
        return {_stage_of(f): f for f in files}

    def program_stage(self) -> str:
        """The last pass that shaped the Program (the rewritten graph that trained), before any
        lowering pass: what `inspect` shows by default and `--diff` compares with the capture."""
        from sparsec.passes import build_lowering_pipeline

        lowering = {p.name for p in build_lowering_pipeline()}  # their IR is the lowered copy's
        names = [name for name in self.snapshots((FX_SUFFIX,)) if name not in lowering]
        if not names:
            raise UserError(f"{self.path}: no IR snapshots in {IR_DIR}/")
        return names[-1]

    def ir(self, stage: str | None = None) -> str:
        """The IR after `stage` (the Program's IR by default)."""
        snapshots = self.snapshots()
        if not snapshots:
            raise UserError(f"{self.path}: no IR snapshots in {IR_DIR}/")
        if stage is None:
            return snapshots[self.program_stage()].read_text(errors="replace")
        if stage not in snapshots:
            raise UserError(f"{self.path}: no IR after {stage!r} (stages: {', '.join(snapshots)})")
        return snapshots[stage].read_text(errors="replace")

    def graph(self) -> nx.DiGraph:
        path = self.path / "graph.json"
        if not path.is_file():
            raise UserError(f"{self.path}: no graph.json (was this folder written by an older sparsec?)")
        record = _read_json(path)
        try:
            return to_networkx(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: is not a sparsec graph record ({type(exc).__name__}: {exc})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path}: cannot be read as JSON ({type(exc).__name__})") from exc


# -------------------------------------------------------------------------------------- graphs
def to_networkx(record: dict[str, Any]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in record["nodes"]:
        graph.add_node(node["name"], **{k: v for k, v in node.items() if k != "name"})
    graph.add_edges_from(tuple(edge) for edge in record["edges"])
    return graph


ROLE_SPARSE_OP = "sparse_op"  # a site op that lowering made block-sparse (marked from the report)
_DOT_STYLE = {  # role -> DOT attributes that make masks and scores stand out
    ROLE_MASK: 'shape=box, style=filled, fillcolor="#f4a582"',
    ROLE_SCORES: 'shape=box, style=filled, fillcolor="#92c5de"',
    ROLE_MASKED_WEIGHT: 'shape=octagon, style=filled, fillcolor="#fddbc7"',
    ROLE_SITE_OP: 'shape=ellipse, style=filled, fillcolor="#d9f0d3"',
    ROLE_SPARSE_OP: 'shape=ellipse, style=filled, fillcolor="#5aae61"',
}
_OP_SHAPE = {"placeholder": "invhouse", "output": "house", "get_attr": "note"}


def to_dot(graph: nx.DiGraph, name: str = "sparsec") -> str:
    """DOT text for `graph` (networkx writes DOT only through pydot or pygraphviz, neither of
    which sparsec depends on)."""
    lines = [f"digraph {_quote(name)} {{", "  node [fontname=Helvetica, fontsize=10];"]
    for node, data in graph.nodes(data=True):
        label = f"{node}\\n{data.get('target', '')}"
        if data.get("role"):
            label += f"\\n[{data['role']}]"
        style = _DOT_STYLE.get(data.get("role", ""), f"shape={_OP_SHAPE.get(data.get('op', ''), 'ellipse')}")
        lines.append(f"  {_quote(node)} [label={_quote(label)}, {style}];")
    lines += [f"  {_quote(a)} -> {_quote(b)};" for a, b in graph.edges()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + str(text).replace('"', '\\"') + '"'


def to_graphml(graph: nx.DiGraph) -> str:
    return "\n".join(nx.generate_graphml(graph)) + "\n"


# --------------------------------------------------------------------------------- the command
def inspect_text(folder: OutputFolder, stage: str | None = None, diff: bool = False) -> str:
    """What `sparsec inspect` prints: the IR (or a diff) and the per-layer density table."""
    report = folder.report()
    if diff:
        snapshots = folder.snapshots()
        first = list(snapshots)[0]
        last = stage if stage is not None else folder.program_stage()
        before, after = folder.ir(first), folder.ir(last)  # ir() checks that `stage` exists
        lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                     fromfile=f"ir/{snapshots[first].name}",
                                     tofile=f"ir/{snapshots[last].name}")
        return "".join(lines)
    text = folder.ir(stage)
    if stage is not None:
        return text
    table = "\n".join(format_layers(report.get("layers", [])))
    density = report.get("density")
    summary = f"density {density:.4f} (asked {report.get('density_asked') or 0:.4f})" if density is not None else \
        "no masks (compilation stopped before the rewrite)"
    return f"{text}\n# per-layer density ({summary})\n{table}\n"


def inspect_graph(folder: OutputFolder, fmt: str) -> str:
    graph = folder.graph()
    if fmt == "dot":
        return to_dot(graph, folder.path.name)
    if fmt == "graphml":
        return to_graphml(graph)
    raise UserError(f"unknown format {fmt!r} (allowed: text, dot, graphml)")
