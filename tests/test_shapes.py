"""Which input dimensions are dynamic (sparsec.shapes), and what the ONNX checks make of them: the
batch always; others only where the model runs at another size; a wrong example is a capture
error; NaN or a shape that differs is never a match."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparsec.capture import capture
from sparsec.errors import CaptureError
from sparsec.export.check import relative_error
from sparsec.ir import graph_info
from sparsec.shapes import batched_for_capture, plan
from tests.helpers import cnn, cnn_input, mlp, mlp_input, zoo_inputs, zoo_model


def test_cnn_channels_are_static_and_its_image_size_dynamic():
    dims = plan(cnn(), (cnn_input(batch=2, size=6),), {})
    assert dims.dims == ((0, 2, 3),)


def test_vit_image_size_is_static_and_bert_sequence_dynamic():
    args, kwargs = zoo_inputs("vit", 2, 8)
    assert plan(zoo_model("vit"), args, kwargs).dims == ((0,),)      # position embeddings fix 16x16
    args, kwargs = zoo_inputs("bert", 2, 8)
    assert plan(zoo_model("bert"), args, kwargs).dims == ((0, 1), (0, 1))  # input_ids, attention_mask


def test_mlp_features_are_static_in_the_captured_graph():
    gm = capture(mlp(), (mlp_input(batch=3),))
    assert graph_info(gm).dynamic.dims == ((0,),)
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert not isinstance(x.meta["val"].shape[0], int) and x.meta["val"].shape[1] == 8


def test_a_batch_of_1_is_repeated_for_capture():
    (x,), _ = batched_for_capture((torch.arange(6.0).reshape(1, 6),), {})
    assert x.shape == (2, 6) and torch.equal(x[0], x[1])


def test_an_example_the_model_cannot_take_is_a_capture_error_with_its_cause():
    with pytest.raises(CaptureError, match=r"does not run on its example inputs \(3x5\): RuntimeError: mat1 and mat2"):
        capture(mlp(), (torch.randn(3, 5),))


@pytest.mark.parametrize("got, want, expected", [
    ([np.array([1.0, np.nan])], [np.array([1.0, 2.0])], math.inf),        # NaN where PyTorch is finite
    ([np.array([1.0, 2.0])], [np.array([1.0, np.nan])], math.inf),
    ([np.array([1.0, np.nan])], [np.array([1.0, np.nan])], 0.0),          # the same NaN is a match
    ([np.array([np.inf])], [np.array([-np.inf])], math.inf),              # an inf of the other sign
    ([np.zeros((2, 3))], [np.zeros((3, 2))], math.inf),                   # a shape that differs
    ([np.zeros(3)], [np.zeros(3), np.zeros(3)], math.inf),                # an output missing
    ([np.array([1.0, 4.0])], [np.array([1.0, 2.0])], 1.0),                # relative to max(1, |y|)
])
def test_relative_error_counts_non_finite_and_shape_mismatches_as_infinite(got, want, expected):
    assert relative_error(got, want) == expected
