"""safe_views: contiguous -> clone(contiguous_format), view -> reshape in the lowered copy; the
outputs stay bit-identical and T5, whose attention output is a view of a transpose, exports."""
from __future__ import annotations

import torch

import sparsec
from sparsec.capture import capture
from sparsec.passes import BakeMasks, SafeViews, build_pipeline
from sparsec.pipeline import run_pipeline
from sparsec.spec import load_spec
from tests.helpers import spec_dict, zoo_inputs, zoo_model

aten = torch.ops.aten


class Heads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x):  # x [batch, heads, seq, head]
        b, h, s, d = x.shape
        return self.fc(x.transpose(1, 2).contiguous().view(b, s, h * d))


def test_views_become_reshapes_and_contiguous_a_clone_with_the_same_outputs():
    model, x = Heads().eval(), torch.randn(2, 4, 5, 4)
    gm = capture(model, (x,))
    gm = run_pipeline(gm, build_pipeline(load_spec(spec_dict(["fc.weight"], method="magnitude"))))
    gm = run_pipeline(gm, [BakeMasks(), SafeViews()])
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert aten.view.default not in targets and aten.contiguous.default not in targets
    assert aten.reshape.default in targets and aten.clone.default in targets
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_t5_exports_with_dynamic_shapes(tmp_path):
    model = zoo_model("t5")
    args, kwargs = zoo_inputs("t5", 2, 8)
    spec = spec_dict(["*"], method="magnitude", density=0.25, block=(16, 16), exclude=["*shared*"])
    prog = sparsec.compile(model, spec, args, kwargs).eval()
    result = prog.export_onnx(tmp_path / "t5.onnx", policy="always")
    assert result.sparse_nodes >= 4 and max(c.error for c in result.checks) < 1e-4
