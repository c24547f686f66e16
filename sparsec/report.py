"""The compile report: what was pruned, how dense it is, what it cost in accuracy, what lowering did.

`build_report` gathers the facts into a JSON-serializable dict (`report.json`); `format_report`
renders the same dict as the text printed at the end of `sparsec compile` (`report.txt`).
Densities are always read from the masks, never from what the schedule asked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsec.ir import LayerPlan
from sparsec.site import Site
from sparsec.text import format_table


def build_report(*, model_path: str | Path, spec: Any, capture_tool: str, sites: list[Site],
                 left_out: dict[str, str], prog: Any, result: Any,
                 stopped_after: str | None = None, metric_dense: float | None = None,
                 metric_pruned: float | None = None,
                 lowering: dict[str, Any] | None = None, warnings: list[str] | None = None) -> dict[str, Any]:
    """The report as plain data; `prog` (the Program) is None when compilation stopped before
    masks existed, `result` (the TrainResult) when nothing was trained."""
    achieved = prog.site_densities() if prog is not None else {}
    layers = [_layer(site, achieved.get(site.name)) for site in sites]
    total = sum(layer["parameters"] for layer in layers)
    asked = sum(layer["asked_density"] * layer["parameters"] for layer in layers) / total if total else None
    if result is not None:
        metric_dense = result.metric_dense if metric_dense is None else metric_dense
        metric_pruned = result.metric_pruned
    return {
        "model_file": str(model_path),
        "spec": spec.source,
        "capture": capture_tool,
        "stopped_after": stopped_after,
        "steps_trained": result.steps if result is not None else 0,
        "schedule_step": int(prog.step_count) if prog is not None else None,
        "final_loss": result.final_loss if result is not None else None,
        "objective": result.objective if result is not None else None,
        "train_seconds": round(result.seconds, 2) if result is not None else None,
        "resumed_from": result.resumed_from if result is not None else None,
        "metric_dense": metric_dense,
        "metric_pruned": metric_pruned,
        "density_asked": asked,
        "density": prog.density() if prog is not None else None,
        "parameters_kept": sum(layer["kept"] or 0 for layer in layers) if prog is not None else None,
        "parameters_total": total,
        "layers": layers,
        "left_out": dict(left_out),
        # loss-modelling methods: Delta-L = |L(theta + dtheta) - L(theta)| per pruning iteration
        "pruning_iterations": list(getattr(result, "pruning_iterations", []) or []),
        "prunes": list(getattr(result, "prunes", []) or []),
        "warnings": list(warnings or []),
        **({"lowering": lowering} if lowering is not None else {}),
    }


def _layer(site: Site, achieved: float | None) -> dict[str, Any]:
    kept = round(achieved * site.numel) if achieved is not None else None
    return {"site": site.name, "shape": list(site.shape), "block": list(site.block),
            "group": site.group, "method": site.method,
            "asked_density": site.density if site.density is not None else 1.0,
            "density": achieved, "kept": kept, "parameters": site.numel}


def lowering_section(*, int8: bool, policy: str, plans: list[LayerPlan], model: Any, dense: Any,
                     folder: Path, model_file: str, dense_file: str,
                     bench: dict[str, Any] | None, target: str = "sparsec") -> dict[str, Any]:
    """The report's lowering part: the plan per site, both files with their checks, the timing."""
    return {
        "int8": int8,
        "policy": policy,
        "target": target,
        "layers": [plan.to_dict() for plan in plans],
        "model": {**model.to_dict(), "path": model_file, "bytes": (folder / model_file).stat().st_size},
        "dense": {**dense.to_dict(), "path": dense_file, "bytes": (folder / dense_file).stat().st_size},
        "bench": bench,
    }


def _num(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _shape(values: list[int]) -> str:
    return "x".join(str(v) for v in values)


def format_report(report: dict[str, Any]) -> str:
    """The report as a readable text block with a per-layer table."""
    lines = [
        f"model file    {report['model_file']}",
        f"spec          {report['spec']}",
        f"capture       {report['capture']}",
    ]
    if report.get("stopped_after"):
        lines.append(f"stopped after {report['stopped_after']}")
    lines.append(f"steps trained {report['steps_trained']}" +
                 (f" in {report['train_seconds']:.1f} s" if report.get("train_seconds") else "") +
                 (f" (resumed after step {report['resumed_from']})" if report.get("resumed_from") else ""))
    lines.append(f"final loss    {_num(report['final_loss'])}")
    if report.get("objective"):
        lines.append(f"loss          {report['objective']}")
    if report.get("metric_dense") is not None or report.get("metric_pruned") is not None:
        lines.append(f"metric        dense {_num(report['metric_dense'])}  "
                     f"pruned {_num(report['metric_pruned'])}")
    if report.get("density") is not None:
        lines.append(f"density       {report['density']:.4f} (asked {_num(report['density_asked'])}), "
                     f"{report['parameters_kept']:,} of {report['parameters_total']:,} site weights kept")
    lines += [f"warning       {w}" for w in report.get("warnings", [])]
    lines += ["", *format_layers(report["layers"])]
    if report.get("pruning_iterations"):
        lines += ["", "pruning iterations (Delta-L = |L(theta + dtheta) - L(theta)| on the estimate's examples):"]
        lines += [f"  step {it['step']:>6}  density {it['density']:.4f}  loss {it['loss_before']:.4f} -> "
                  f"{it['loss_after']:.4f}  Delta-L {it['delta_loss']:.4f}" for it in report["pruning_iterations"]]
    if report.get("prunes"):
        lines += ["", "prunes (Delta-L of the whole prune before any fine-tuning, loss modelling Table 1):"]
        lines += [f"  step {p['step']:>6}  {p['iterations']} iteration(s)  density {p['density_before']:.4f} -> "
                  f"{p['density']:.4f}  loss {p['loss_before']:.4f} -> {p['loss_after']:.4f}  "
                  f"Delta-L {p['delta_loss']:.4f}" for p in report["prunes"]]
    if report.get("left_out"):
        lines += ["", f"left out ({len(report['left_out'])}):"]
        lines += [f"  {name}: {why}" for name, why in report["left_out"].items()]
    if report.get("lowering"):
        lines += ["", *format_lowering(report["lowering"])]
    if report.get("lowering_error"):
        lines += ["", f"lowering failed: {report['lowering_error']}"]
    return "\n".join(lines)


def format_layers(layers: list[dict[str, Any]]) -> list[str]:
    """The per-layer density table."""
    rows = [(layer["site"], _shape(layer["shape"]), _shape(layer["block"]),
             _num(layer["asked_density"], ".3f"), _num(layer["density"], ".3f"),
             f"{'-' if layer['kept'] is None else format(layer['kept'], ',')} / {layer['parameters']:,}")
            for layer in layers]
    if not rows:
        return ["no sparsity sites selected"]
    return format_table(("site", "shape", "block", "asked", "density", "kept / total"), rows, {3, 4, 5})


def _checks(checks: list[dict[str, Any]]) -> list[str]:
    """Max error vs PyTorch per set of input shapes, every runtime on one line."""
    by_inputs: dict[str, list[str]] = {}
    for check in checks:
        shapes = ", ".join(f"{n} {_shape(s)}" for n, s in check.get("inputs", {}).items()) or "the example inputs"
        by_inputs.setdefault(shapes, []).append(f"{check['runtime']} {check['error']:.1e}")
    if not by_inputs:
        return ["not verified"]
    return [f"max error vs PyTorch on {shapes}: {', '.join(found)}" for shapes, found in by_inputs.items()]


RUNTIMES = {"sparsec": "onnxruntime with sparsec's kernel", "stock": "stock onnxruntime, function bodies"}


def _layer_costs(layers: list[dict[str, Any]]) -> list[str]:
    """Per site: the decision, the measured dense and sparse times (or the estimate, marked so)."""
    rows = []
    for layer in layers:
        measured = layer.get("measured")
        estimate = layer.get("speedup_estimate")
        if measured:
            times = (f"{measured['dense_ms']:.3f}", f"{measured['sparse_ms']:.3f}",
                     f"{measured['speedup']:.2f}x")
        else:
            times = ("-", "-", f"est. {estimate:.2f}x" if estimate is not None else "-")
        rows.append((layer["site"], "block-sparse" if layer["lowered"] else "dense", *times,
                     layer["reason"]))
    lines = format_table(("site", "lowered to", "dense ms", "sparse ms", "speedup", "why"), rows, {2, 3, 4})
    if any(not layer.get("measured") and layer.get("basis", "").startswith("estimated") for layer in layers):
        lines.append("est.: estimated by the constant cost model, not measured on this machine")
    return lines


def format_lowering(section: dict[str, Any]) -> list[str]:
    """The report's lowering part: per-site decision, the files, their checks and speed."""
    target = section.get("target", "sparsec")
    lines = [f"lowering ({'int8' if section['int8'] else 'fp32'} blocks, policy {section['policy']}, "
             f"target {target}: {RUNTIMES.get(target, target)}):"]
    lines += _layer_costs(section["layers"]) if section["layers"] else ["  no sites"]
    model, dense = section["model"], section["dense"]
    lines.append("")
    for label, entry in ((model["path"], model), (dense["path"], dense)):
        lines.append(f"{label:17s} {entry['bytes'] / 1e6:8.3f} MB, {entry['sparse_nodes']} sparse nodes")
        lines += [f"{'':17s} {line}" for line in _checks(entry["checks"])]
    if model.get("error_vs_dense") is not None:
        lines.append(f"{'':17s} lowered vs dense PyTorch program: max error {model['error_vs_dense']:.1e}"
                     f" (relative to the output scale)")
    lines.append(f"{'':17s} file {dense['bytes'] / model['bytes']:.2f}x smaller than the dense export")
    lines += [f"note: {n}" for n in model.get("notes", [])]
    check = model.get("stock_check")
    if check:
        lines.append("whole file on stock onnxruntime vs the dense file (each alone, medians):")
        lines += [f"  {a['sparse_layers']:3d} sparse layers: {a['sparse_ms']:9.3f} ms vs dense "
                  f"{a['dense_ms']:9.3f} ms = {a['speedup']:.2f}x" for a in check["attempts"]]
        lines.append(f"  {check['outcome']}")
    bench = section.get("bench")
    if bench:
        shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in bench.get("inputs", {}).items())
        lines.append(f"onnxruntime latency ({bench['repeats']} interleaved runs, medians; inputs "
                     f"{shapes}):")
        for name, ms in bench["medians_ms"].items():
            speedup = bench["speedup"].get(name)
            lines.append(f"  {name:38s} {ms:9.3f} ms" + (f"  {speedup:.2f}x" if speedup else ""))
        lines += [f"  note: {n}" for n in bench.get("notes", [])]
    return lines
