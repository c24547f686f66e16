"""report.html: one self-contained page per output folder (inline SVG charts and PNG masks, its
own small stylesheet, no script, nothing fetched), opened from disk in any browser.

Every section is drawn by one function of the Run; a section whose data is missing (an older or
partial folder) shows why in its place instead of failing the page.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable

from sparsec.htmlreport import masks as maskpics
from sparsec.htmlreport import plots
from sparsec.htmlreport.layers import group_layers
from sparsec.htmlreport.run import NoData, Run
from sparsec.text import escaped

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;
text-align:left;vertical-align:top}th{background:#f6f6f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.nodata{color:#777;font-style:italic}.warn{color:#a50026}.chart svg{max-width:100%;height:auto}
.masks{display:flex;flex-wrap:wrap;gap:18px}.mask{max-width:360px}.mask img{image-rendering:pixelated;
image-rendering:crisp-edges;border:1px solid #999;max-width:340px;max-height:340px}.mask p{font-size:12px;margin:4px 0}
code{font-size:12px}nav a{margin-right:12px;font-size:13px}.lowered{color:#1a7f37;white-space:nowrap}.dense{color:#777;white-space:nowrap}.muted{color:#777}
"""
SECTIONS = [("summary", "Run"), ("curves", "Training curves"), ("layers", "Remaining weights per layer"),
            ("masks", "Masks"), ("lowering", "Lowering"), ("files", "Files"), ("pipeline", "Pipeline")]


def esc(value: Any) -> str:
    """Text for the page: control characters written as escapes (a name from a model cannot
    hide or restyle anything), then HTML-escaped."""
    return html.escape(escaped(str(value)), quote=True)


def num(value: Any, fmt: str = ".4f") -> str:
    return "-" if not isinstance(value, (int, float)) else format(value, fmt)


def table(header: list[str] | None, rows: list[list[str]], numeric: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    """An HTML table (no header row for None); cells are already HTML (escape text with `esc`)."""
    if header is None:
        return "<table><tbody>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                                          for row in rows) + "</tbody></table>"
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def section(key: str, title: str, draw: Callable[[], str]) -> str:
    """One section; its body, or why there is none (missing data, or a file that cannot be read)."""
    try:
        body = draw()
    except NoData as exc:
        body = f"<p class='nodata'>No data: {esc(exc)}</p>"
    except Exception as exc:  # noqa: BLE001 - a picture never costs the rest of the page (or the compile)
        body = (f"<p class='nodata'>Not drawn: this section failed on this folder's files "
                f"({esc(type(exc).__name__)}: {esc(exc)})</p>")
    return f"<section id='{key}' data-section='{key}'><h2>{esc(title)}</h2>\n{body}\n</section>"


def document(title: str, body: str, nav: list[tuple[str, str]]) -> str:
    links = "".join(f"<a href='#{key}'>{esc(name)}</a>" for key, name in nav)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>"
            f"<nav>{links}</nav>\n{body}\n</body></html>\n")


def render(run: Run, html_path: Path | None = None, name: str | None = None) -> str:
    """The whole page for `run` (titled with `name`, default the folder's name); links to the IR
    files are relative to where the page is written (`html_path`, default OUT/report.html)."""
    where = (html_path or run.path / "report.html").parent
    draws: dict[str, Callable[[], str]] = {
        "summary": lambda: summary(run), "curves": lambda: plots_of_curves(run),
        "layers": lambda: layers(run), "masks": lambda: masks(run), "lowering": lambda: lowering(run),
        "files": lambda: files(run), "pipeline": lambda: pipeline(run, where)}
    body = "\n".join(section(key, title, draws[key]) for key, title in SECTIONS)
    return document(f"sparsec report: {name or run.name}", body, SECTIONS)


# ------------------------------------------------------------------------------------ sections
def summary(run: Run) -> str:
    r = run.need_report()
    methods = sorted({str(layer.get("method")) for layer in r.get("layers", []) if layer.get("method")})
    steps = f"{r.get('steps_trained', 0)}" + (f" in {r['train_seconds']:.1f} s" if r.get("train_seconds") else "")
    if r.get("resumed_from"):
        steps += f" (resumed after step {r['resumed_from']})"
    rows = [["model file", esc(r.get("model_file", "-"))], ["spec", esc(r.get("spec", "-"))],
            ["capture", esc(r.get("capture", "-"))], ["methods", esc(", ".join(methods) or "-")],
            ["steps trained", esc(steps)], ["final loss", num(r.get("final_loss"))],
            ["metric", f"dense {num(r.get('metric_dense'))} &rarr; pruned {num(r.get('metric_pruned'))}"]]
    if r.get("density") is not None:
        rows.append(["density", f"reached <b>{num(r['density'])}</b>, asked {num(r.get('density_asked'))}; "
                     f"{r.get('parameters_kept') or 0:,} of {r.get('parameters_total') or 0:,} site weights kept"])
    else:
        rows.append(["density", "no masks (compilation stopped before the rewrite)"])
    if r.get("stopped_after"):
        rows.append(["stopped after", esc(r["stopped_after"])])
    if r.get("objective"):
        rows.append(["loss", esc(r["objective"])])
    out = table(None, rows)
    out += "".join(f"<p class='warn'>warning: {esc(w)}</p>" for w in r.get("warnings", []))
    if r.get("left_out"):
        out += f"<details><summary>{len(r['left_out'])} weights left out</summary>"
        out += table(["weight", "why"], [[esc(k), esc(v)] for k, v in r["left_out"].items()]) + "</details>"
    return out


def plots_of_curves(run: Run) -> str:
    curves = run.curves()
    return f"<div class='chart'>{plots.curves(curves)}</div><p>{len(curves.steps)} steps from <code>{esc(curves.source)}</code>.</p>"


def layers(run: Run) -> str:
    groups = group_layers(run.layers())
    rows = [[esc(g.block), esc(part), esc(layer["site"]), esc("x".join(map(str, layer.get("shape", [])))),
             esc("x".join(map(str, layer.get("block", [])))), num(layer.get("asked_density"), ".3f"),
             num(layer.get("density"), ".3f"),
             f"{layer['kept']:,} / {layer.get('parameters', 0):,}" if layer.get("kept") is not None else "-"]
            for g in groups for part, layer in g.layers]
    return (f"<div class='chart'>{plots.layer_bars(groups)}</div>"
            + table(["block", "part", "site", "shape", "block shape", "asked", "reached", "kept / total"],
                    rows, {5, 6, 7}))


def masks(run: Run) -> str:
    found, source = run.masks()
    out = [f"<p>Dark: kept, white: pruned (grey: a cell partly kept). From the {esc(source)}.</p>"]
    for group in group_layers(run.layers()):
        figures = [_mask_figure(layer["site"], part, found[layer["site"]], layer.get("block") or [1, 1])
                   for part, layer in group.layers if layer["site"] in found]
        if figures:
            out.append(f"<h3>{esc(group.block)}</h3><div class='masks'>{''.join(figures)}</div>")
    missing = [layer["site"] for layer in run.layers() if layer["site"] not in found]
    if missing:
        out.append(f"<p class='nodata'>No mask stored for {esc(', '.join(missing))}.</p>")
    return "\n".join(out)


def _mask_figure(site: str, part: str, mask: Any, block: list[int]) -> str:
    pic = maskpics.picture(mask, block)
    rows, cols = pic.grid.shape
    scale = max(1, min(340 // max(rows, cols, 1), 24))
    return (f"<figure class='mask'><img alt='mask of {esc(site)}' src='{maskpics.data_uri(maskpics.png(pic))}' "
            f"width='{cols * scale}' height='{rows * scale}'><p><b>{esc(part)}</b> {esc(site)} "
            f"{esc('x'.join(map(str, mask.shape)))}</p><p>{esc(pic.caption())}</p></figure>")


def lowering(run: Run) -> str:
    section = run.lowering()
    layers = section.get("layers", [])
    # per-layer times measured on the target runtime (recorded by newer versions as `measured`)
    measured = any(isinstance(layer.get("measured"), dict) for layer in layers)
    rows = []
    for layer in layers:
        state = "<span class='lowered'>block-sparse</span>" if layer.get("lowered") else "<span class='dense'>dense</span>"
        row = [esc(layer.get("site")), state, esc("x".join(map(str, layer.get("block") or [])) or "-"),
               num(layer.get("block_density"), ".3f"), num(layer.get("speedup_estimate"), ".2f")]
        if measured:
            times = layer.get("measured") if isinstance(layer.get("measured"), dict) else {}
            row += [num(times.get("dense_ms"), ".3f"), num(times.get("sparse_ms"), ".3f"),
                    num(times.get("speedup"), ".2f")]
        why = esc(layer.get("reason", ""))
        if layer.get("basis") and not isinstance(layer.get("measured"), dict):
            why += f" <span class='muted'>({esc(layer['basis'])})</span>"
        rows.append(row + [why])
    header = ["site", "lowered to", "block", "block density", "est. speedup"] + \
        (["dense ms", "sparse ms", "measured speedup"] if measured else []) + ["why"]
    target = f", target {esc(section['target'])}" if section.get("target") else ""
    out = f"<p>{'int8' if section.get('int8') else 'fp32'} blocks, policy {esc(section.get('policy', '-'))}{target}.</p>"
    out += table(header, rows, {3, 4, 5, 6, 7} if measured else {3, 4}) if rows else "<p>No sites.</p>"
    if not measured:
        out += ("<p class='nodata'>Per-layer speedups are the cost model's estimates (no per-layer "
                "times recorded in this folder); the whole model's measured latency is below.</p>")
    out += _checks(section)
    out += _bench(section.get("bench"))
    return out


def _checks(section: dict[str, Any]) -> str:
    rows = []
    for key in ("model", "dense"):
        entry = section.get(key) or {}
        for check in entry.get("checks", []):
            shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in check.get("inputs", {}).items())
            rows.append([esc(entry.get("path", key)), esc(check.get("runtime")), esc(shapes), num(check.get("error"), ".1e")])
    out = "<h3>Verification against PyTorch</h3>" + (table(["file", "runtime", "inputs", "max error"], rows, {3})
                                                   if rows else "<p class='nodata'>Not verified.</p>")
    error = (section.get("model") or {}).get("error_vs_dense")
    if error is not None:
        out += f"<p>Lowered vs dense PyTorch program: max error {error:.1e} (relative to the output scale).</p>"
    return out


def _bench(bench: dict[str, Any] | None) -> str:
    if not bench:
        return "<h3>Latency</h3><p class='nodata'>No data: not benchmarked (export.bench = false).</p>"
    shapes = ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in bench.get("inputs", {}).items())
    speedups = bench.get("speedup", {})
    rows = [[esc(name), num(ms, ".3f"), num(speedups.get(name), ".2f") + ("x" if speedups.get(name) else "")]
            for name, ms in bench.get("medians_ms", {}).items()]
    return (f"<h3>Latency (onnxruntime, {bench.get('repeats', '?')} interleaved runs, medians; inputs {esc(shapes)})</h3>"
            + table(["variant", "ms", "vs dense"], rows, {1, 2})
            + "".join(f"<p class='nodata'>note: {esc(n)}</p>" for n in bench.get("notes", [])))


def files(run: Run) -> str:
    found = run.files()
    rows = [[f"<code>{esc(name)}</code>", f"{size / 1e6:.3f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"]
            for name, size in found]
    out = table(["file", "size"], rows, {1})
    sizes = dict(found)
    if sizes.get("model.onnx") and sizes.get("model.dense.onnx"):
        out += (f"<p>model.onnx is {sizes['model.dense.onnx'] / sizes['model.onnx']:.2f}x smaller than "
                f"model.dense.onnx.</p>")
    return out


def pipeline(run: Run, where: Path) -> str:
    items = []
    for index, (stage, path) in enumerate(run.snapshots().items()):
        link = os.path.relpath(path, where)
        kind = "ONNX" if path.name.endswith(".onnx.txt") else "FX"
        items.append(f"<li><a href='{esc(Path(link).as_posix())}'>{esc(stage)}</a> <span class='muted'>"
                     f"({kind}, {path.stat().st_size / 1e3:.1f} kB)</span></li>")
    return ("<p>The IR after capture and after every pass, in order (the files in <code>ir/</code>):</p>"
            f"<ol start='0'>{''.join(items)}</ol>")
