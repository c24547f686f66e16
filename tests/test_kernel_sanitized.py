"""The native kernel under AddressSanitizer and UBSan: tests/kernel_fuzz.py's malformed nodes all end in
a clear error and its valid nodes give the reference's answer on every instruction set, with no
memory or undefined-behaviour report (the sanitized library aborts on the first one)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsec.runtime import BuildError
from sparsec.runtime import build as builder

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def sanitized():
    try:
        library = builder.build(sanitize=True).library
        preload = builder.sanitizer_preload()
    except BuildError as err:
        pytest.skip(f"no sanitized kernel here: {err}")
    return library, preload


@pytest.mark.slow  # building the instrumented library takes ~40 s
def test_malformed_and_valid_nodes_under_asan_and_ubsan(sanitized):
    library, preload = sanitized
    env = dict(os.environ, SPARSEC_KERNEL_LIB=str(library), LD_PRELOAD=":".join(map(str, preload)),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("SPARSEC_KERNEL_ISA", None)
    env.pop("SPARSEC_DISABLE_KERNEL", None)
    proc = subprocess.run([sys.executable, str(TESTS / "kernel_fuzz.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    report = [ln for ln in out.splitlines() if "Sanitizer" in ln or "runtime error" in ln or ln.startswith("FAIL")]
    assert proc.returncode == 0, "\n".join(report[:20] or out.splitlines()[-20:])
    assert "sanitizers: on" in proc.stdout
    assert " 0 failures" in proc.stdout and "cases" in proc.stdout
