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

import contextlib
import os
import tempfile
from pathlib import Path

REPORT_HTML = "report.html"


def write_text_atomically(path: Path, text: str) -> None:
    """`path` replaced by `text` in one rename (temp file in the same folder)."""
    from sparsec.errors import UserError
    from sparsec.paths import file_mode

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UserError(f"{path}: cannot be written ({exc.strerror or type(exc).__name__})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_report(out: str | Path, target: str | Path | None = None, name: str | None = None) -> Path:
    """Write (or refresh) the HTML report of the output folder `out` to `target` (default
    OUT/report.html), titled with `name` (default the folder's name); returns where it went."""
    from sparsec.htmlreport.page import render
    from sparsec.htmlreport.run import Run

    run = Run.open(out)
    path = Path(target) if target is not None else run.path / REPORT_HTML
    write_text_atomically(path, render(run, path, name))
    return path
