"""Several output folders side by side (`sparsec inspect OUT1 OUT2 ...`), e.g. magnitude vs
movement pruning at 10%: one row per run (method, density asked and reached, metric, measured
speedup, file size) and the per-site densities, as a text table or an HTML page with the charts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsec.htmlreport import plots
from sparsec.htmlreport.layers import place
from sparsec.htmlreport.page import document, esc, num, section, table
from sparsec.htmlreport.run import NoData, Run
from sparsec.text import format_table

# the measured speedup shown per run: the sparsec kernel's when it ran, else stock onnxruntime's
_SPEEDUP_VARIANTS = {"sparse (sparsec kernel)": "kernel", "sparse (onnxruntime, function body)": "stock"}
SPEEDUP_NOTE = ("speedup: measured latency vs dense onnxruntime, on sparsec's kernel (kernel) or, without it, "
                "stock onnxruntime running the function bodies (stock); file smaller: model.dense.onnx / model.onnx")


def summary_row(run: Run) -> dict[str, Any]:
    """What the comparison shows of one run (None where the folder does not have it)."""
    r = run.report or {}
    lowering = r.get("lowering") or {}
    speedups = (lowering.get("bench") or {}).get("speedup") or {}
    variant = next((v for v in _SPEEDUP_VARIANTS if speedups.get(v) is not None), None)
    model, dense = (lowering.get("model") or {}).get("bytes"), (lowering.get("dense") or {}).get("bytes")
    return {"methods": ", ".join(sorted({str(x.get("method")) for x in r.get("layers", []) if x.get("method")})) or None,
            "asked": r.get("density_asked"), "density": r.get("density"),
            "metric_dense": r.get("metric_dense"), "metric": r.get("metric_pruned"),
            "speedup": speedups.get(variant) if variant else None,
            "speedup_variant": _SPEEDUP_VARIANTS[variant] if variant else None,
            "smaller": dense / model if model and dense else None,
            "steps": r.get("steps_trained"), "problem": run.report_problem or None}


def site_densities(run: Run) -> dict[str, float | None]:
    return {str(x.get("site")): x.get("density") for x in (run.report or {}).get("layers", [])}


def all_sites(runs: list[Run]) -> list[str]:
    """The sites of every run, in the order of the first run that has each."""
    seen: dict[str, None] = {}
    for run in runs:
        seen.update({site: None for site in site_densities(run)})
    return list(seen)


def names(runs: list[Run]) -> list[str]:
    """Short unique labels: the folder names, with their parent where two are the same."""
    short = [run.name for run in runs]
    return [f"{run.path.parent.name}/{run.name}" if short.count(run.name) > 1 else run.name for run in runs]


def compare_text(runs: list[Run]) -> str:
    """The comparison for the terminal: one table of runs, one of per-site densities."""
    labels = names(runs)
    rows = []
    for label, run in zip(labels, runs):
        s = summary_row(run)
        rows.append((label, s["methods"] or "-", num(s["asked"], ".3f"), num(s["density"], ".3f"),
                     num(s["metric_dense"]), num(s["metric"]),
                     num(s["speedup"], ".2f") + (f"x {s['speedup_variant']}" if s["speedup"] is not None else ""),
                     num(s["smaller"], ".2f") + ("x" if s["smaller"] is not None else "")))
    lines = format_table(("run", "method", "asked", "density", "metric dense", "metric pruned",
                          "speedup", "file smaller"), rows, {2, 3, 4, 5, 6, 7})
    lines += [f"{label}: {run.report_problem}" for label, run in zip(labels, runs) if run.report_problem]
    lines.append(SPEEDUP_NOTE)
    sites = all_sites(runs)
    if sites:
        densities = [site_densities(run) for run in runs]
        site_rows = [(site, place(site).part, *(num(d.get(site), ".3f") for d in densities)) for site in sites]
        lines += ["", "per-site density:", *format_table(("site", "part", *labels), site_rows,
                                                          set(range(2, 2 + len(runs))))]
    return "\n".join(lines) + "\n"


def compare_html(runs: list[Run]) -> str:
    """The comparison as one self-contained page: the table, the per-site bars and the
    metric/speedup against density plot."""
    labels = names(runs)
    rows_data = [summary_row(run) for run in runs]

    def overview() -> str:
        rows = [[esc(label), esc(s["methods"] or "-"), num(s["asked"], ".3f"), num(s["density"], ".3f"),
                 num(s["metric_dense"]), num(s["metric"]),
                 num(s["speedup"], ".2f") + (f" ({esc(s['speedup_variant'])})" if s["speedup_variant"] else ""),
                 num(s["smaller"], ".2f"), esc(s["problem"] or "")]
                for label, s in zip(labels, rows_data)]
        header = ["run", "method", "asked", "density", "metric dense", "metric pruned", "speedup (measured)",
                  "file smaller", "problem"]
        return (table(header, rows, {2, 3, 4, 5, 6, 7}) + f"<p>{esc(SPEEDUP_NOTE)}.</p>"
                + f"<div class='chart'>{plots.compare_points(labels, rows_data)}</div>")

    def per_site() -> str:
        sites = all_sites(runs)
        if not sites:
            raise NoData("no run has sparsity sites")
        densities = [site_densities(run) for run in runs]
        rows = [[esc(site), esc(place(site).part), *(num(d.get(site), ".3f") for d in densities)] for site in sites]
        return (f"<div class='chart'>{plots.compare_bars(labels, sites, densities)}</div>"
                + table(["site", "part", *labels], rows, set(range(2, 2 + len(runs)))))

    def folders() -> str:
        return "<ul>" + "".join(f"<li>{esc(label)}: <code>{esc(run.path.resolve())}</code></li>"
                                for label, run in zip(labels, runs)) + "</ul>"

    body = "\n".join([section("overview", "Runs", overview), section("sites", "Density per site", per_site),
                      section("folders", "Folders", folders)])
    return document(f"sparsec comparison: {', '.join(labels)}", body,
                    [("overview", "Runs"), ("sites", "Density per site"), ("folders", "Folders")])


def write_comparison(outs: list[str | Path], target: str | Path) -> Path:
    from sparsec.paths import write_text_atomically

    path = Path(target)
    write_text_atomically(path, compare_html([Run.open(out) for out in outs]))
    return path
