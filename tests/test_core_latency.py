"""bench/core_latency.cc, the probe that bench/peers.py runs before each process: the round trip of a
cache line between two CPUs, and its refusals (which must not hang or print a number)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
from _common import core_round_trip_ns  # noqa: E402

from sparsec.runtime.build import BuildError, find_compiler  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))


def compiler_or_skip() -> str:
    try:
        return find_compiler()
    except BuildError:
        pytest.skip("no C++ compiler")


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_round_trip_is_measured(monkeypatch, tmp_path):
    compiler_or_skip()
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    first = core_round_trip_ns()
    again = core_round_trip_ns()  # the cached binary
    assert list((tmp_path / "bench").iterdir())[0].name.startswith("core_latency-")
    # A cache line between two cores: tens of ns at best, microseconds when the machine is loaded.
    for trip in (first, again):
        assert trip is not None and 10.0 < trip < 50_000.0, trip


def test_probe_refuses_bad_arguments(tmp_path):
    compiler = compiler_or_skip()
    binary = tmp_path / "core_latency"
    subprocess.run([compiler, "-O2", "-pthread", str(BENCH / "core_latency.cc"), "-o", str(binary)], check=True)
    unusable = max(CPUS) + 1  # not in this process's set: pinning there fails
    for args, message in (([], "usage"), (["0", "0"], "two different CPUs"), (["0", "1", "0"], "positive count"),
                          ([str(CPUS[0]), str(unusable), "1000"], f"cannot run on CPU {unusable}"),
                          ([str(unusable), str(CPUS[0]), "1000"], f"cannot run on CPU {unusable}")):
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and proc.stdout == "" and message in proc.stderr, (args, proc)



@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_a_probe_that_cannot_be_built_gives_none(monkeypatch, tmp_path):
    """peers.py then prints no round trips instead of stopping."""
    import sparsec.runtime.build as build

    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "find_compiler", lambda: "/bin/false")
    assert core_round_trip_ns() is None
    assert not (tmp_path / "bench").exists() or not list((tmp_path / "bench").iterdir())
