"""Golden IR: the printed IR (`sparsec.ir.format_ir`) after each pass of the pipeline, for a plain
MLP (captured with torch.export) and a tiny CNN with batch norm, compared with the checked-in
files tests/golden/<model>.<pass>.txt.

After an intended change to a pass or to the printer, rewrite the files and review the diff:

    SPARSEC_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden_ir.py
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sparsec.capture import capture
from sparsec.passes import build_pipeline
from sparsec.pipeline import Instruments, run_pipeline
from tests.helpers import cnn, cnn_input, make_spec, mlp, mlp_input

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("SPARSEC_UPDATE_GOLDEN") == "1"

MODELS = {
    # a movement group and a magnitude group, 4x4 blocks (fc3 [4, 16] and fc1 [16, 8])
    "mlp": (lambda: mlp(p=0.1), lambda: (mlp_input(),), {
        "prune": [{"targets": ["fc1.*", "fc2.*"], "method": "movement", "density": 0.1,
                   "scope": "global", "block": [4, 4]},
                  {"targets": ["fc3.*"], "method": "magnitude", "density": 0.5, "scope": "local",
                   "block": [1, 1]}],
        "schedule": {"kind": "cubic", "total": 100, "warmup": 10, "cooldown": 10},
    }),
    # convolutions (one not divisible by its block) and the batch norm made mode-aware
    "cnn": (cnn, lambda: (cnn_input(),), {
        "prune": [{"targets": ["conv*", "fc.*"], "method": "magnitude", "density": 0.25,
                   "scope": "local", "block": [2, 4]}],
        "schedule": {"kind": "constant"},
    }),
}


def snapshots(name: str) -> dict[str, str]:
    """pass name -> IR text after it."""
    build, inputs, spec = MODELS[name]
    loaded = make_spec(spec)
    gm = capture(build(), inputs())
    inst = Instruments(snapshots=[])
    run_pipeline(gm, build_pipeline(loaded), inst)
    return {snapshot.name: snapshot.text for snapshot in inst.snapshots}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_snapshots(request):
    return request.param, snapshots(request.param)


def test_golden_ir_after_each_pass(model_snapshots):
    name, texts = model_snapshots
    assert list(texts) == [p.name for p in build_pipeline(make_spec(MODELS[name][2]))]
    mismatched = []
    for pass_name, text in texts.items():
        path = GOLDEN / f"{name}.{pass_name}.txt"
        if UPDATE:
            path.write_text(text)
            continue
        assert path.exists(), f"{path} is missing: run SPARSEC_UPDATE_GOLDEN=1 pytest {__file__}"
        if path.read_text() != text:
            mismatched.append(path.name)
    assert not mismatched, (f"IR differs from {', '.join(mismatched)}; if intended, run "
                            f"SPARSEC_UPDATE_GOLDEN=1 pytest tests/test_golden_ir.py and review the diff")


def test_no_stale_golden_files():
    expected = {f"{name}.{p.name}.txt" for name, (_, _, spec) in MODELS.items()
                for p in build_pipeline(make_spec(spec))}
    present = {p.name for p in GOLDEN.glob("*.txt")}
    assert present == expected or UPDATE, f"stale: {sorted(present - expected)}, missing: {sorted(expected - present)}"


def test_ir_text_is_deterministic(model_snapshots):
    name, texts = model_snapshots
    again = snapshots(name)
    assert again == texts
    for text in texts.values():
        assert not re.search(r"0x[0-9a-f]{6,}", text), "memory address in the IR"
        assert "/work/" not in text and "site-packages" not in text, "file path in the IR"


def test_golden_content_is_meaningful(model_snapshots):
    name, texts = model_snapshots
    if name == "mlp":
        after = texts["insert_masks"]
        assert "sparsec_ops_straight_through_mask(fc1_weight, fc1_weight_mask, fc1_weight_scores, (4, 4))" in after
        assert "sparsec_ops_apply_mask(fc3_weight, fc3_weight_mask)" in after
        assert "self.sparsec_mode.dropout_0(" in after
    else:
        assert "# site conv1.weight: shape=[4, 3, 3, 3] op=conv" in texts["select_sites"]
        assert "padding=[0, 1]" in texts["select_sites"]  # conv1 as [4, 27] in 2x4 blocks
        assert "self.sparsec_mode.batch_norm_1(" in texts["make_mode_aware"]
