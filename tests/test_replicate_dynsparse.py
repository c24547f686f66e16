"""bench/replicate/dynsparse.py at a tiny scale (--smoke: a synthetic stand-in corpus, nothing
downloaded): the masking follows BERT's 80/10/10 rule on non-special tokens, the dynsparse and
static runs share their start, only dynsparse moves its blocks, and the JSON has the issue's keys."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "replicate" / "dynsparse.py"


def load_script():
    spec = importlib.util.spec_from_file_location("replicate_dynsparse", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_masking_is_berts_80_10_10_on_non_special_tokens():
    script = load_script()
    ids = torch.randint(5, 1000, (400, 64))
    ids[:, 0], ids[:, -1] = 2, 3                      # [CLS] ... [SEP]
    inputs, positions, targets = script.mask_tokens(ids, 1000, 5, 4, torch.Generator().manual_seed(0))
    flat_in, flat_ids = inputs.reshape(-1), ids.reshape(-1)
    assert torch.equal(flat_ids[positions], targets)
    assert not bool((ids[:, [0, -1]] != inputs[:, [0, -1]]).any())   # specials never chosen
    chosen = positions.numel() / (400 * 62)
    assert abs(chosen - 0.15) < 0.01
    masked = float((flat_in[positions] == 4).float().mean())
    unchanged = float((flat_in[positions] == targets).float().mean())
    assert abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1 - 0.001) < 0.02
    outside = torch.ones_like(flat_ids, dtype=torch.bool)
    outside[positions] = False
    assert torch.equal(flat_in[outside], flat_ids[outside])


def test_smoke_run_writes_the_results(tmp_path):
    script = load_script()
    out = tmp_path / "dynsparse.json"
    before = torch.get_num_threads()
    try:
        script.main(["--smoke", "--steps", "8", "--evals", "1", "--hidden", "64", "--layers", "1",
                     "--seq", "16", "--batch", "4", "--eval-sequences", "8", "--seeds", "0",
                     "--runs", "dyn16", "static16", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").exists()
    runs = {r["run"]: r for r in result["runs"]}
    assert set(runs) == {"dyn16", "static16"}
    for r in runs.values():
        for key in ("method", "density", "seed", "metric", "loss", "delta_loss", "steps", "seconds"):
            assert key in r
        assert r["metric"] == -r["loss"] and r["delta_loss"] is None and r["steps"] == 8
    assert runs["dyn16"]["method"] == "dynsparse" and runs["static16"]["method"] == "static"
    # the same start (weights, pattern, eval masks); only dynsparse explores new blocks
    assert runs["dyn16"]["curve"][0]["loss"] == runs["static16"]["curve"][0]["loss"]
    assert runs["static16"]["explored_dof"] == pytest.approx(runs["static16"]["density"], abs=1e-3)
    assert runs["dyn16"]["explored_dof"] > runs["dyn16"]["density"] + 0.05
