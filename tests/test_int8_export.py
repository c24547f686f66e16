"""INT8 compute end to end: a BERT-shaped model (small config) exported with `int8=True` runs on the
kernel and on stock onnxruntime (function bodies), both within int8_tolerance of the INT8 PyTorch
program, and its output stays within a few 1e-3 of the fp32 file's (the accuracy cost, reported in
docs/kernel.md)."""
from __future__ import annotations

import onnx
import pytest
import torch

import sparsec
from sparsec import runtime
from sparsec.export.check import relative_error
from tests.helpers import spec_dict


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=512, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.slow  # two BERT exports, ~1-2 min
def test_bert_int8_compute_accuracy_vs_fp32(tmp_path):
    if not runtime.kernel_available():
        pytest.skip(f"native kernel not available: {runtime.unavailable_reason()}")
    model, kwargs = _bert()
    spec = spec_dict(["encoder.layer.*.weight"], method="magnitude", density=0.3, scope="local", block=(16, 16))
    prog = sparsec.compile(model, spec, (), kwargs).eval()
    fp32 = prog.export_onnx(tmp_path / "bert.onnx", policy="always")
    int8 = prog.export_onnx(tmp_path / "bert.int8.onnx", policy="always", int8=True)
    graph = onnx.load(int8.path).graph
    compute = {(n.op_type, a.s.decode()) for n in graph.node if n.domain == "sparsec" for a in n.attribute
               if a.name == "compute"}
    assert compute == {("BlockSparseLinear", "int8"), ("Attention", "bf16")}   # attention: [export] auto
    # per layer: Q, K and V as one node (fuse_qkv; the Attention reads it packed), the attention
    # output, FFN in and FFN out
    assert sum(n.op_type == "BlockSparseLinear" and n.domain == "sparsec" for n in graph.node) == 8
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "sparsec"]
    assert len(attentions) == 2 and all("packed_qkv" in {a.name for a in n.attribute} for n in attentions)
    assert len({c.runtime for c in int8.checks}) == 2  # stock onnxruntime and the kernel
    assert max(c.error for c in int8.checks) < 1e-2     # vs the INT8 PyTorch program (int8_tolerance)

    feeds = {k: v.numpy() for k, v in kwargs.items()}
    y32 = runtime.session(str(fp32.path)).run(None, feeds)
    y8 = runtime.session(str(int8.path)).run(None, feeds)
    error = relative_error(y8, y32)
    print(f"INT8 compute vs fp32 file: max abs error {error:.2e} of the output scale; "
          f"vs the dense program {int8.error_vs_dense:.2e}")
    assert 0 < error < 2e-2
