"""Shared helpers for the benchmarks: interleaved timing (sparsec.bench.interleaved) with medians,
machine description."""
from __future__ import annotations

import hashlib
import os
import platform
import statistics
import subprocess
from pathlib import Path

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


def core_round_trip_ns() -> float | None:
    """Nanoseconds for one cache line to go from the first CPU this process may use to the second and
    back (bench/core_latency.cc, compiled once into sparsec's cache). On a VM it tells where the host
    has placed the vCPUs at this moment, which the kernel's two-thread time follows (docs/BENCHMARKS.md,
    "Rows per core"). None with fewer than two CPUs, no C++ compiler, or a probe that fails or takes
    over a minute."""
    from sparsec.runtime.build import BuildError, cache_dir, find_compiler

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    source = Path(__file__).resolve().parent / "core_latency.cc"
    try:
        compiler = find_compiler()
    except BuildError:
        return None
    key = hashlib.sha256(source.read_bytes() + compiler.encode()).hexdigest()[:16]
    binary = cache_dir() / "bench" / f"core_latency-{key}"
    try:
        if not binary.exists():
            binary.parent.mkdir(parents=True, exist_ok=True)
            tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
            subprocess.run([compiler, "-O2", "-pthread", str(source), "-o", str(tmp)], check=True,
                           capture_output=True)
            os.replace(tmp, binary)
        proc = subprocess.run([str(binary), str(cpus[0]), str(cpus[1])], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):  # no build, or a machine too loaded to answer in time
        return None
    return float(proc.stdout) if proc.returncode == 0 else None


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
