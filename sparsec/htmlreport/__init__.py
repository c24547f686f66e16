"""The pictures of a compile: `report.html` in every output folder, comparisons of several folders
and the rewritten graph as SVG (`sparsec inspect OUT --html | --format svg`, `sparsec inspect OUT1 OUT2`).

    run.py      an output folder read forgivingly (older and partial folders too)
    layers.py   sites grouped by transformer block and part (Q/K/V/O, FFN in/out)
    masks.py    a mask as a picture of the blocks kept, downsampled
    plots.py    the matplotlib charts, as inline SVG
    page.py     report.html, section by section
    compare.py  several folders side by side (text and HTML)
    graph.py    the rewritten graph as SVG (graphviz `dot` when installed, a layered layout otherwise)
"""
from __future__ import annotations

from pathlib import Path

from sparsec.paths import write_text_atomically

REPORT_HTML = "report.html"


def write_report(out: str | Path, target: str | Path | None = None, name: str | None = None) -> Path:
    """Write (or refresh) the HTML report of the output folder `out` to `target` (default
    OUT/report.html), titled with `name` (default the folder's name); returns where it went."""
    from sparsec.htmlreport.page import render
    from sparsec.htmlreport.run import Run

    run = Run.open(out)
    path = Path(target) if target is not None else run.path / REPORT_HTML
    write_text_atomically(path, render(run, path, name))
    return path
