"""The report's charts, drawn with matplotlib (Agg) and returned as inline SVG text: the training
curves (as in the PINS paper's Figures 1-2), remaining weights per layer grouped by block (the
movement pruning paper's Figure 6), and the comparison of several runs.
"""
from __future__ import annotations

import functools
import io
from typing import Any, Callable

from sparsec.htmlreport.layers import Group
from sparsec.htmlreport.run import Curves
from sparsec.text import escaped

ASKED, REACHED = "#bbbbbb", "#2166ac"


# svg.hashsalt stays unset: each figure's clip-path ids are then unique within the page
STYLE = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def styled(draw: Callable[..., str]) -> Callable[..., str]:
    """Run a chart function under the report's matplotlib style, leaving the caller's settings alone."""
    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        with pyplot().rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def to_svg(fig: Any) -> str:
    """The figure as SVG text for inlining (no XML prolog; the page shrinks it to fit)."""
    plt = pyplot()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


@styled
def curves(c: Curves) -> str:
    """Loss, density, learning rates and metric over the steps, four small panels."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 2.8))
    _line(axes[0], c.steps, c.loss, "loss", "tab:blue")
    _line(axes[1], c.steps, c.density, "density", "tab:red")
    axes[1].set_ylim(0, 1.05)
    groups = max((len(r) for r in c.lrs), default=0)
    if groups:
        for i in range(groups):
            values = [r[i] if i < len(r) else None for r in c.lrs]
            label = "weights" if i == 0 else ("scores" if i == 1 and groups == 2 else f"group {i}")
            axes[2].plot(c.steps[:len(values)], [v if v is not None else float("nan") for v in values],
                         label=label, linewidth=1)
        rates = [v for r in c.lrs for v in r if v > 0]
        if rates and max(rates) / min(rates) > 20:   # weights and scores often differ by 10-100x
            axes[2].set_yscale("log")
        axes[2].legend(frameon=False, fontsize=8)
        axes[2].set_title("learning rates")
    else:
        _empty(axes[2], "learning rates", "not recorded")
    if c.metric:
        steps, values = zip(*c.metric)
        axes[3].plot(steps, values, marker="o", markersize=3, color="tab:green", linewidth=1)
        axes[3].set_title("metric")
    else:
        _empty(axes[3], "metric", "not evaluated during training")
    for axis in axes:
        axis.set_xlabel("step")
    fig.tight_layout()
    return to_svg(fig)


def _line(axis: Any, steps: list[int], values: list[float | None], title: str, color: str) -> None:
    if not any(v is not None for v in values):
        _empty(axis, title, "not recorded")
        return
    axis.plot(steps, [v if v is not None else float("nan") for v in values], color=color, linewidth=1)
    axis.set_title(title)


def _empty(axis: Any, title: str, why: str) -> None:
    axis.set_title(title)
    axis.text(0.5, 0.5, why, ha="center", va="center", transform=axis.transAxes, color="#777777")
    axis.set_xticks([])
    axis.set_yticks([])


@styled
def layer_bars(groups: list[Group]) -> str:
    """Remaining weights per site, asked (grey) vs reached (blue), grouped by block."""
    plt = pyplot()
    labels, asked, reached, starts = [], [], [], []
    for group in groups:
        starts.append((len(labels), group.block))
        for part, layer in group.layers:
            labels.append(escaped(part))
            asked.append(float(layer.get("asked_density") or 0.0))
            reached.append(float(layer["density"]) if layer.get("density") is not None else float("nan"))
    width = max(6.0, min(26.0, 0.32 * len(labels) + 1.5))
    fig, axis = plt.subplots(figsize=(width, 3.4))
    xs = list(range(len(labels)))
    axis.bar([x - 0.2 for x in xs], asked, width=0.4, color=ASKED, label="asked")
    axis.bar([x + 0.2 for x in xs], reached, width=0.4, color=REACHED, label="reached")
    axis.set_xticks(xs, labels, rotation=90, fontsize=7)
    axis.set_ylabel("remaining weights")
    axis.set_ylim(0, 1.05)
    axis.set_xlim(-0.7, len(labels) - 0.3)
    for i, (start, block) in enumerate(starts):
        if i:
            axis.axvline(start - 0.5, color="#dddddd", linewidth=0.8)
        end = starts[i + 1][0] if i + 1 < len(starts) else len(labels)
        axis.text((start + end - 1) / 2, 1.06, escaped(_short(block)), ha="center", va="bottom", fontsize=7,
                  rotation=0 if end - start > 2 else 90)
    axis.legend(frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.12), ncol=2)
    fig.tight_layout()
    return to_svg(fig)


def _short(block: str) -> str:
    """`bert.encoder.layer.3` -> `layer 3` (the block's own name, the path is in the table)."""
    parts = block.split(".")
    if len(parts) >= 2 and parts[-1].isdigit():
        return f"{parts[-2]} {parts[-1]}"
    return parts[-1] if block != "(top level)" else block


@styled
def compare_bars(names: list[str], sites: list[str], densities: list[dict[str, float | None]]) -> str:
    """Per-site density of several runs side by side (one colour per run)."""
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(max(6.0, min(26.0, 0.3 * len(sites) * len(names) + 2)), 3.6))
    width = 0.8 / max(1, len(names))
    for i, (name, values) in enumerate(zip(names, densities)):
        ys = [values.get(s) if values.get(s) is not None else float("nan") for s in sites]
        axis.bar([x - 0.4 + width * (i + 0.5) for x in range(len(sites))], ys, width=width, label=escaped(name))
    axis.set_xticks(range(len(sites)), [escaped(s) for s in sites], rotation=90, fontsize=7)
    axis.set_ylabel("remaining weights")
    axis.set_ylim(0, 1.05)
    axis.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return to_svg(fig)


@styled
def compare_points(names: list[str], rows: list[dict[str, Any]]) -> str:
    """Metric against density, and speedup against density, one point per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for axis, key, title in ((axes[0], "metric", "metric (pruned)"), (axes[1], "speedup", "measured speedup")):
        shown = [(name, row) for name, row in zip(names, rows)
                 if row.get("density") is not None and row.get(key) is not None]
        if not shown:
            _empty(axis, title, "no run has it")
            continue
        for name, row in shown:
            axis.scatter([row["density"]], [row[key]], label=escaped(name), s=30)
            axis.annotate(escaped(name), (row["density"], row[key]), fontsize=7, xytext=(4, 4), textcoords="offset points")
        axis.set_xlabel("density")
        axis.set_title(title)
    fig.tight_layout()
    return to_svg(fig)
