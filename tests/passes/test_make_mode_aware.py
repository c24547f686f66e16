"""make_mode_aware: train/eval-baked ops become ModeSwitch modules that follow train()/eval()."""
from __future__ import annotations

import pytest
import torch

from sparsec.capture import capture
from sparsec.errors import PassError
from sparsec.ir import ROLE_MODE, graph_info, nodes_with_role
from sparsec.modes import ModeSwitch
from sparsec.passes import MakeModeAware
from sparsec.pipeline import run_pipeline
from tests.helpers import cnn, cnn_input, mlp, mlp_input


def _mode_nodes(gm):
    return {str(n.target): gm.get_submodule(str(n.target)) for n in nodes_with_role(gm, ROLE_MODE)}


def test_dropout_becomes_mode_switch():
    gm = run_pipeline(capture(mlp(p=0.3), (mlp_input(),)), [MakeModeAware()])
    switches = _mode_nodes(gm)
    assert list(switches) == ["sparsec_mode.dropout_0"]
    switch = switches["sparsec_mode.dropout_0"]
    assert isinstance(switch, ModeSwitch)
    assert (switch.key, switch.train_value, switch.eval_value) == ("train", True, False)
    assert "mode_aware" in graph_info(gm).facts
    assert not any(n.op == "call_function" and "dropout" in str(n.target) for n in gm.graph.nodes)


def test_batch_norm_and_its_counter_become_mode_switches():
    gm = run_pipeline(capture(cnn(), (cnn_input(),)), [MakeModeAware()])
    switches = _mode_nodes(gm)
    # export puts `num_batches_tracked += 1` before the batch norm itself
    assert list(switches) == ["sparsec_mode.batch_count_0", "sparsec_mode.batch_norm_1"]
    kinds = {(s.key, s.train_value, s.eval_value) for s in switches.values()}
    assert kinds == {("training", True, False), ("alpha", 1, 0)}


def test_numerics_in_both_modes():
    model = cnn()
    gm = run_pipeline(capture(model, (cnn_input(),)), [MakeModeAware()])
    x = cnn_input(3, 5)
    model.eval(), gm.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)
    model.train(), gm.train()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_mode_switch_follows_the_parent_module():
    gm = run_pipeline(capture(mlp(p=0.5), (mlp_input(),)), [MakeModeAware()])
    switch = gm.get_submodule("sparsec_mode.dropout_0")
    gm.eval()
    assert not switch.training
    gm.train()
    assert switch.training


def test_batch_norm_without_running_stats_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    gm = run_pipeline(capture(model, (cnn_input(),)), [MakeModeAware()])
    assert _mode_nodes(gm) == {}
    gm.eval(), model.eval()
    x = cnn_input(2, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=1e-6)


def test_printed_ir_names_the_switch():
    from sparsec.ir import format_ir

    gm = run_pipeline(capture(mlp(p=0.3), (mlp_input(),)), [MakeModeAware()])
    text = format_ir(gm, "make_mode_aware")
    assert "# sparsec_mode_dropout_0: follows the train/eval mode (train: train=True eval=False)" in text
    assert "self.sparsec_mode.dropout_0(" in text


def test_requires_a_captured_graph():
    gm = capture(mlp(), (mlp_input(),))
    graph_info(gm).facts.discard("captured")
    with pytest.raises(PassError, match=r"pass make_mode_aware: requires captured, which no earlier pass"):
        run_pipeline(gm, [MakeModeAware()])
