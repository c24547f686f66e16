"""Shared fixtures. Keep this small: helpers for one test file belong in that file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

MODELS = Path(__file__).parent / "models"

# Export decides with the constant cost model in tests (deterministic, no timing on a loaded
# machine); reports say "estimated, not measured: SPARSEC_MEASURE=0". Tests of the measured path
# (tests/test_target_runtime.py) remove it, with a fake timer or a real one.
os.environ.setdefault("SPARSEC_MEASURE", "0")


@pytest.fixture
def models_dir() -> Path:
    """tests/models/: tiny model.py files (good and deliberately broken) and specs for CLI tests."""
    return MODELS


@pytest.fixture
def sparsec_cli(capsys):
    """Run `sparsec ARGS...` in-process: returns (exit code, stdout, stderr)."""
    from sparsec.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
