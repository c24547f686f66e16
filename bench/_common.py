"""Shared helpers for the benchmarks: interleaved timing (sparsec.bench.interleaved) with medians,
machine description."""
from __future__ import annotations

import os
import platform
import statistics

from sparsec.bench import interleaved  # noqa: F401  (re-exported for the bench scripts)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def save_figure(fig, path) -> None:
    """A matplotlib figure laid out and written as `path` in one rename, then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp" + path.suffix)
    fig.savefig(tmp)
    os.replace(tmp, path)
    plt.close(fig)
