"""Shared fixtures. Keep this small: helpers for one test file belong in that file."""
from __future__ import annotations

from pathlib import Path

import pytest

MODELS = Path(__file__).parent / "models"


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
