"""One output folder read for the pictures, forgivingly: a folder written by an older sparsec (no
train.jsonl, no lowering section, no graph.json) or one that stopped early still loads, and each
missing piece is None with the reason a section can show.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsec.errors import UserError
from sparsec.inspection import IR_DIR, MARKER, OutputFolder
from sparsec.ir import mask_name


class NoData(Exception):
    """A section of the report has nothing to show; the message says why (shown in its place)."""


@dataclass
class Curves:
    """Per-step history: loss, density, learning rates (one list per optimizer group) and the
    metric where it was evaluated."""

    steps: list[int]
    loss: list[float | None]
    density: list[float | None]
    lrs: list[list[float]]
    metric: list[tuple[int, float]]
    source: str                        # the file they came from


@dataclass
class Run:
    """An output folder's facts (lazily for the tensors)."""

    path: Path
    report: dict[str, Any] | None
    report_problem: str = ""
    _masks: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """A sparsec output folder (its marker or its report.json must be there)."""
        folder = Path(path)
        if not folder.exists():
            raise UserError(f"{folder}: no such output folder (write one with sparsec compile)")
        if not folder.is_dir():
            raise UserError(f"{folder}: is not a folder; pass the folder that sparsec compile -o wrote")
        if not (folder / MARKER).is_file() and not (folder / "report.json").is_file():
            raise UserError(f"{folder}: not a sparsec output folder (no {MARKER} marker or report.json); "
                            f"pass the folder that sparsec compile -o wrote")
        try:
            return cls(folder, OutputFolder(folder).report())
        except UserError as exc:
            return cls(folder, None, str(exc))

    @property
    def name(self) -> str:
        return self.path.name

    def need_report(self) -> dict[str, Any]:
        if self.report is None:
            raise NoData(self.report_problem or "no report.json")
        return self.report

    def layers(self) -> list[dict[str, Any]]:
        layers = self.need_report().get("layers") or []
        if not layers:
            raise NoData("no sparsity sites (the spec selected none, or compilation stopped before select)")
        return layers

    def lowering(self) -> dict[str, Any]:
        report = self.need_report()
        if report.get("lowering"):
            return report["lowering"]
        if report.get("lowering_error"):
            raise NoData(f"lowering failed: {report['lowering_error']}")
        if report.get("stopped_after"):
            raise NoData(f"compilation stopped after {report['stopped_after']}, before lowering")
        raise NoData("no lowering section in report.json (written before lowering, or by an older sparsec)")

    # ------------------------------------------------------------------------------- history
    def curves(self) -> Curves:
        """From train.jsonl (one record per step), else from train.json (older folders)."""
        jsonl, whole = self.path / "train.jsonl", self.path / "train.json"
        if jsonl.is_file():
            records = []
            for line in jsonl.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue   # a line cut by a kill: the rest is still worth showing
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
            if records:
                return Curves(steps=[r["step"] for r in records], loss=[_float(r.get("loss")) for r in records],
                              density=[_float(r.get("density")) for r in records],
                              lrs=[_floats(r.get("lr")) for r in records],
                              metric=[(r["step"], float(r["metric"])) for r in records
                                      if isinstance(r.get("metric"), (int, float))],
                              source=jsonl.name)
        if whole.is_file():
            try:
                data = json.loads(whole.read_text())
                losses = [_float(x) for x in data.get("losses", [])]
            except (ValueError, AttributeError, TypeError):
                raise NoData(f"{whole.name} cannot be read") from None
            if losses:
                densities = [_float(x) for x in data.get("densities", [])]
                return Curves(steps=list(range(1, len(losses) + 1)), loss=losses,
                              density=densities + [None] * (len(losses) - len(densities)),
                              lrs=[_floats(x) for x in data.get("lrs", [])],
                              metric=[(int(s), float(v)) for s, v in data.get("metric_history", [])],
                              source=whole.name)
        raise NoData("no training history (no train.jsonl or train.json: nothing was trained)")

    # --------------------------------------------------------------------------------- masks
    def masks(self) -> tuple[dict[str, np.ndarray], str]:
        """Site -> mask as a numpy array, and where they came from: the masks in
        state.safetensors, else the nonzero pattern of the sites' weights in model.safetensors."""
        sites = [layer["site"] for layer in self.layers()]
        state, model = self.path / "state.safetensors", self.path / "model.safetensors"
        if state.is_file():
            found = _tensors(state, {s: mask_name(s) for s in sites})
            if found:
                return {s: t != 0 for s, t in found.items()}, f"masks in {state.name}"
        if model.is_file():
            found = _tensors(model, {s: s for s in sites})
            if found:
                return {s: t != 0 for s, t in found.items()}, f"nonzero weights in {model.name} (no masks stored)"
        raise NoData("no masks: neither state.safetensors nor model.safetensors holds the sites")

    # ---------------------------------------------------------------------------------- files
    def files(self) -> list[tuple[str, int]]:
        """(path in OUT, bytes) of every file, IR snapshots summed as one entry."""
        out, ir_bytes, ir_count = [], 0, 0
        for path in sorted(self.path.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            rel = path.relative_to(self.path)
            if rel.parts[0] == IR_DIR:
                ir_bytes, ir_count = ir_bytes + path.stat().st_size, ir_count + 1
            else:
                out.append((str(rel), path.stat().st_size))
        if ir_count:
            out.append((f"{IR_DIR}/ ({ir_count} snapshots)", ir_bytes))
        return out

    def snapshots(self) -> dict[str, Path]:
        found = OutputFolder(self.path).snapshots()
        if not found:
            raise NoData(f"no IR snapshots in {IR_DIR}/")
        return found


def _tensors(path: Path, wanted: dict[str, str]) -> dict[str, np.ndarray]:
    """Site -> tensor `wanted[site]` of the safetensors file (under that key, or under the
    Program's `module.` prefix), read one by one (a large model's other weights stay on disk)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            found = {}
            for site, key in wanted.items():
                name = key if key in keys else f"module.{key}"
                if name in keys:
                    found[site] = f.get_tensor(name).float().numpy()
            return found
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise NoData(f"{path.name} cannot be read ({type(exc).__name__})") from None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _floats(value: Any) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value if isinstance(v, (int, float))] if isinstance(value, list) else []
