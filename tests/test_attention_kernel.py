"""sparsec::Attention: the kernel (fp32 on AVX-512 and AVX2, bf16 on AMX tiles or AVX512-BF16; below AVX2 it
invokes onnxruntime's own Attention) against onnxruntime's Attention and a float64 reference, NaN / inf /
masked-row semantics included; its function body on stock onnxruntime; bad nodes and inputs; and the
lower_attention choices in an export."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from sparsec import runtime
from sparsec.lowering import attention_op
from sparsec.runtime.build import library_isa

ISAS = ["scalar", "avx2", "avx512"]


@pytest.fixture(scope="module")
def lib():
    try:
        return runtime.build_kernel()
    except runtime.BuildError as err:
        pytest.skip(f"native kernel cannot be built here: {err}")


def model(domain: str, B, Sq, Skv, Hq, Hkv, D, Dv, mask=None, compute: str = "fp32", packed: bool = False,
          **attrs) -> bytes:
    """One Attention node (ONNX's, or sparsec's with its function body) on 3-D q, k, v (sparsec's
    `packed`: one input qkv, packed_qkv)."""
    kind = "" if mask is None else "bool" if mask.dtype == bool else "float"
    shape = () if mask is None else mask.shape
    return attention_op.single_node_model((B, Sq, Skv, Hq, Hkv, D, Dv), compute if domain else "", kind, shape,
                                          packed=packed, **attrs).SerializeToString()


def session(data: bytes, kernel: bool, threads: int = 2) -> ort.InferenceSession:
    options = runtime.session_options(threads) if kernel else ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def feeds(B, Sq, Skv, Hq, Hkv, D, Dv, mask=None, seed=0):
    rng = np.random.default_rng(seed)
    f = {"q": rng.standard_normal((B, Sq, Hq * D)).astype(np.float32),
         "k": rng.standard_normal((B, Skv, Hkv * D)).astype(np.float32),
         "v": rng.standard_normal((B, Skv, Hkv * Dv)).astype(np.float32)}
    if mask is not None:
        f["mask"] = mask
    return f


def both(f, shape, mask=None, compute="fp32", **attrs):
    """(onnxruntime's Attention, sparsec's kernel) on the same feeds."""
    want = session(model("", *shape, mask, **attrs), kernel=False).run(None, f)[0]
    got = session(model("sparsec", *shape, mask, compute=compute, **attrs), kernel=True).run(None, f)[0]
    return want, got


def assert_same_specials(want, got):
    assert want.shape == got.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))


def bool_mask(shape, seed=3, p=0.3):
    return np.random.default_rng(seed).random(shape) > p


def float_mask(shape, seed=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) + np.where(rng.random(shape) > 0.3, 0.0, -np.inf)).astype(np.float32)


# (B, Sq, Skv, Hq, Hkv, D, Dv), the mask's shape and kind, causal
CASES = [
    ((1, 128, 128, 12, 12, 64, 64), None, None, 0),
    ((2, 7, 13, 4, 2, 8, 24), (2, 1, 7, 13), bool, 0),          # grouped K/V heads, D != Dv
    ((1, 130, 130, 2, 1, 80, 80), (1, 1, 130, 130), float, 1),  # row and key tails, causal
    ((3, 1, 65, 3, 3, 16, 16), (3, 3, 1, 65), float, 0),        # one query row, a mask per head
    ((1, 64, 200, 2, 2, 128, 128), (64, 200), bool, 0),         # 2-D mask, D > 64
    ((2, 17, 17, 1, 1, 5, 3), None, None, 1),                   # tiny heads
    ((1, 33, 47, 2, 2, 40, 72), (1, 2, 33, 47), bool, 0),       # Dv over 64, not a multiple of 16
]
IDS = ["bert", "gqa", "tails-causal", "one-row", "2d-mask", "tiny", "wide-v"]


def case_inputs(shape, mshape, kind):
    mask = None if mshape is None else bool_mask(mshape) if kind is bool else float_mask(mshape)
    return feeds(*shape, mask), mask


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,mshape,kind,causal", CASES, ids=IDS)
def test_fp32_kernel_matches_onnxruntime(lib, monkeypatch, isa, shape, mshape, kind, causal):
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    f, mask = case_inputs(shape, mshape, kind)
    want, got = both(f, shape, mask, is_causal=causal)
    assert_same_specials(want, got)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    np.testing.assert_allclose(got, reference(f, shape, mask, causal), atol=2e-6, rtol=0)
    if isa == "scalar":   # onnxruntime's own Attention, invoked by the kernel: the same bits
        np.testing.assert_array_equal(got, want)


def bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).double().numpy()


def reference(f, shape, mask, causal, bf16_products: bool = False):
    """Attention in float64; with `bf16_products` q, k, v and the unnormalised weights rounded to
    bf16 first (the kernel's bf16 computation)."""
    rounded = bf16 if bf16_products else (lambda x: np.asarray(x, np.float64))
    B, Sq, Skv, Hq, Hkv, D, Dv = shape
    q = f["q"].reshape(B, Sq, Hq, D).transpose(0, 2, 1, 3)
    k = np.repeat(f["k"].reshape(B, Skv, Hkv, D).transpose(0, 2, 1, 3), Hq // Hkv, axis=1)
    v = np.repeat(f["v"].reshape(B, Skv, Hkv, Dv).transpose(0, 2, 1, 3), Hq // Hkv, axis=1)
    s = rounded(q) @ rounded(k).transpose(0, 1, 3, 2) / np.sqrt(D)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if causal:
        s = np.where(np.tril(np.ones((Sq, Skv), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    y = (rounded(e.astype(np.float32)) @ rounded(v)) / e.sum(-1, keepdims=True)
    return y.transpose(0, 2, 1, 3).reshape(B, Sq, Hq * Dv)


BF16_PATHS = ("amx", "avx512_bf16")   # where compute="bf16" really rounds to bf16


@pytest.mark.parametrize("cap", ["amx", "avx512"])
@pytest.mark.parametrize("shape,mshape,kind,causal", CASES, ids=IDS)
def test_bf16_kernel_is_the_bf16_computation(lib, monkeypatch, cap, shape, mshape, kind, causal):
    """On AMX tiles (cap amx) and with AVX512-BF16 (cap avx512, or a CPU without AMX): the bf16
    rounding of q, k, v and the weights, nothing more (an exp that differs in the last bits can move
    a weight's rounding by one bf16 step: 1e-3 of a unit output); on a CPU with neither, the fp32
    computation."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", cap)
    f, mask = case_inputs(shape, mshape, kind)
    want, got = both(f, shape, mask, compute="bf16", is_causal=causal)
    assert_same_specials(want, got)
    if library_isa(lib, bf16_attention=True) not in BF16_PATHS:
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
        return
    np.testing.assert_allclose(got, reference(f, shape, mask, causal, bf16_products=True), atol=1e-3, rtol=0)
    assert 1e-4 < np.abs(got - want).max() < 3e-2   # bf16 products, not fp32 ones


@pytest.mark.parametrize("cap", ["avx512", "avx2", "scalar"])
def test_bf16_follows_the_isa_cap(lib, monkeypatch, cap):
    """SPARSEC_KERNEL_ISA=avx512 keeps bf16 attention off the AMX tiles (AVX512-BF16's dot products
    where the CPU has them, else fp32 results); avx2 computes in fp32 on its own path, scalar runs
    onnxruntime's own Attention, bit for bit."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", cap)
    path = library_isa(lib, bf16_attention=True)
    assert path != "amx"
    shape = (1, 40, 40, 2, 2, 32, 32)
    f = feeds(*shape)
    want, got = both(f, shape, compute="bf16")
    if path == "avx512_bf16":
        assert cap == "avx512"
        np.testing.assert_allclose(got, reference(f, shape, None, False, bf16_products=True), atol=1e-3, rtol=0)
        assert np.abs(got - want).max() > 1e-4
    elif path in ("avx512", "avx2"):   # no AVX512-BF16: the fp32 computation
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    else:                              # below AVX2: onnxruntime's own Attention
        assert path == "scalar"
        np.testing.assert_array_equal(got, want)


def special_feeds():
    """Rows and keys that exercise every IEEE rule (see attention_op's docstring)."""
    shape = (1, 37, 37, 2, 2, 16, 16)
    f = feeds(*shape, seed=7)
    f["q"][0, 2, 0] = np.nan                    # a NaN score row (head 0)
    f["k"][0, 9, 17] = np.inf                   # +inf and -inf scores in head 1
    f["k"][0, 10, 18] = -np.inf
    f["v"][0, 5, 0] = np.nan                    # a NaN value: NaN wherever its weight is used
    f["v"][0, 6, 1] = np.inf
    mask = bool_mask((1, 1, 37, 37), p=0.5)
    mask[0, 0, 3, :] = False                    # a fully masked row: 0, NaN / inf where v is
    mask[0, 0, :, 5] = False                    # the NaN value's key masked for every row
    f["mask"] = mask
    return shape, f, mask


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("isa", ISAS + ["amx"])
def test_nan_inf_and_masked_rows_as_onnxruntime(lib, monkeypatch, compute, isa):
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    shape, f, mask = special_feeds()
    want, got = both(f, shape, mask, compute=compute)
    assert np.isnan(want).any() and (want[0, 3] == 0).any()   # the rules are exercised
    assert_same_specials(want, got)
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=3e-2 if compute == "bf16" else 2e-6, rtol=0)
    # a float mask: -inf row, NaN entry, +inf entry, a row of -1e30 (finite: uniform weights)
    fm = np.zeros((1, 1, 37, 37), np.float32)
    fm[0, 0, 4, :] = -np.inf
    fm[0, 0, 5, 7] = np.nan
    fm[0, 0, 6, :] = -1e30
    fm[0, 0, 8, 3] = np.inf
    g = feeds(*shape, fm, seed=8)
    want, got = both(g, shape, fm, compute=compute)
    assert_same_specials(want, got)
    # causal: a +inf score past the diagonal makes its row NaN (the causal -inf is added)
    c = feeds(1, 6, 6, 1, 1, 4, 4, seed=2)
    c["k"][0, 4, 0] = np.inf
    want, got = both(c, (1, 6, 6, 1, 1, 4, 4), compute=compute, is_causal=1)
    assert np.isnan(want[0, 0]).all() or np.isnan(want[0, 1]).all()
    assert_same_specials(want, got)


@pytest.mark.parametrize("mask", [False, True])
def test_function_body_runs_on_stock_onnxruntime(mask):
    """The overloads (with and without the mask) are ONNX's Attention; `scale` and `is_causal`
    pass through when given and default when absent."""
    shape = (2, 9, 11, 4, 2, 8, 8)
    m = bool_mask((2, 1, 9, 11)) if mask else None
    f = feeds(*shape, m)
    for attrs in ({}, {"scale": 0.3, "is_causal": 1}):
        want = session(model("", *shape, m, **attrs), kernel=False).run(None, f)[0]
        stock = session(model("sparsec", *shape, m, compute="bf16", **attrs), kernel=False).run(None, f)[0]
        np.testing.assert_array_equal(stock, want)


def packed_feeds(f: dict) -> dict:
    """The feeds of a packed node: q, k and v side by side as one qkv."""
    out = {"qkv": np.concatenate([f["q"], f["k"], f["v"]], axis=-1)}
    if "mask" in f:
        out["mask"] = f["mask"]
    return out


# (B, S, S, Hq, Hkv, D, Dv), mask shape and kind, causal
# (no fully masked row: the float64 reference of tests/kernel_fuzz.py has NaN there, the kernel 0)
PACKED_CASES = [((1, 128, 128, 12, 12, 64, 64), (1, 1, 128, 128), float, 0),
                ((2, 19, 19, 4, 2, 8, 24), (2, 1, 19, 19), bool, 0),     # grouped K/V, D != Dv, tails
                ((1, 33, 33, 2, 2, 16, 16), None, None, 1),              # causal
                ((1, 1, 1, 2, 1, 40, 72), None, None, 0)]                # one row, Dv over 64


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
@pytest.mark.parametrize("isa", ISAS + ["amx"])
@pytest.mark.parametrize("shape,mshape,kind,causal", PACKED_CASES, ids=["bert", "gqa", "causal", "one-row"])
def test_packed_qkv_reads_its_columns_in_place(lib, monkeypatch, compute, isa, shape, mshape, kind, causal):
    """packed_qkv: Q, K and V as columns of one tensor (what fuse_qkv makes) give the bits of the
    same node on separate inputs, on every path (the kernel's row strides; below AVX2 the copies
    it hands onnxruntime's Attention), and the function body gives onnxruntime's Attention's bits."""
    monkeypatch.setenv("SPARSEC_KERNEL_ISA", isa)
    f, mask = case_inputs(shape, mshape, kind)
    separate = session(model("sparsec", *shape, mask, compute=compute, is_causal=causal), kernel=True).run(None, f)[0]
    packed = session(model("sparsec", *shape, mask, compute=compute, packed=True, is_causal=causal),
                     kernel=True).run(None, packed_feeds(f))[0]
    np.testing.assert_array_equal(packed, separate)
    want = session(model("", *shape, mask, is_causal=causal), kernel=False).run(None, f)[0]
    stock = session(model("sparsec", *shape, mask, compute=compute, packed=True, is_causal=causal),
                    kernel=False).run(None, packed_feeds(f))[0]
    np.testing.assert_array_equal(stock, want)


def loose_model(mask_type: int, **attrs) -> bytes:
    """sparsec::Attention whose inputs declare no shape (and the mask the given element type), so
    that onnxruntime hands the kernel whatever it is fed."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("mask", mask_type, None))
    attrs = {"q_num_heads": 2, "kv_num_heads": 2, **attrs}
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], domain="sparsec", **attrs)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("sparsec", 1)])
    m.ir_version = 10
    attention_op.attach_functions(m)
    return m.SerializeToString()


# (attributes, feeds that replace the valid ones, what the error says)
BAD = [
    ({"q_num_heads": 3}, {}, "multiple of kv_num_heads"),
    ({"softcap": 1.0}, {}, "softcap"),
    ({"compute": "int4"}, {}, "unknown compute"),
    ({"is_causal": 2}, {}, "is_causal must be 0 or 1"),
    ({}, {"q": np.zeros((1, 5, 30), np.float32)}, "do not fit"),
    ({}, {"v": np.zeros((1, 7, 32), np.float32)}, "do not fit"),
    ({}, {"k": np.zeros((5, 32), np.float32)}, "must be float \\[batch, seq, heads \\* head\\]"),
    ({}, {"mask": np.ones((1, 1, 4, 6), bool)}, "does not broadcast"),
    ({}, {"mask": np.ones((1, 1, 1, 1, 6), bool)}, "1 to 4 dimensions"),
    ({}, {"mask": np.ones((1, 1, 5, 6), np.int32)}, "bool or float"),
    ({"packed_qkv": [32, 32, -32]}, {}, "packed_qkv must hold three positive widths"),
    ({"packed_qkv": [0, 48, 48]}, {}, "packed_qkv must hold three positive widths"),
    ({"packed_qkv": [32, 32]}, {}, "packed_qkv must have 3 values"),
    ({"packed_qkv": [32, 32, 32]}, {}, "needs Q, K and V of width 96"),
    ({"packed_qkv": [32, 30, 34]}, {"q": np.zeros((1, 5, 96), np.float32), "k": np.zeros((1, 6, 96), np.float32),
                                    "v": np.zeros((1, 6, 96), np.float32)}, "\\(packed_qkv\\) do not fit"),
]


@pytest.mark.parametrize("attrs,change,message", BAD, ids=["heads", "softcap", "compute", "causal", "q-width", "v-rows", "k-rank", "mask-shape", "mask-rank",
        "mask-type", "packed-negative", "packed-zero", "packed-length", "packed-width", "packed-heads"])
def test_bad_nodes_and_inputs_are_refused_with_the_reason(lib, attrs, change, message):
    """Attributes at session creation, shapes and types at run time: an error naming the op."""
    with pytest.raises(Exception, match=message) as info:
        run_bad(attrs, change)
    assert "Attention" in str(info.value)


def run_bad(attrs: dict, change: dict) -> None:
    """One BAD case: a session of the loose model, then a run (tests/kernel_fuzz.py reuses it)."""
    f = feeds(1, 5, 6, 2, 2, 16, 16, bool_mask((1, 1, 5, 6)))
    f.update(change)
    mask_type = TensorProto.INT32 if f["mask"].dtype == np.int32 else TensorProto.BOOL
    session(loose_model(mask_type, **dict(attrs)), kernel=True).run(None, f)


def test_export_lowers_attention_where_asked(tmp_path):
    """`auto`: a BERT exported with INT8 runs its attentions on the kernel in bf16, in fp32 without
    INT8 (heads of 16), with their Q, K and V projections fused, and keeps onnxruntime's Attention on
    the stock target (its projections fused and split); `onnx` keeps it (and three projections);
    every file passes the export's checks on both runtimes."""
    import onnx
    from transformers import BertConfig, BertModel

    import sparsec

    torch.manual_seed(0)
    model_ = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, 10:] = 0
    spec = {"prune": [{"targets": ["encoder.layer.*.weight"], "method": "magnitude", "density": 0.25,
                       "block": [16, 16]}]}
    prog = sparsec.compile(model_, spec, (), {"input_ids": ids, "attention_mask": am})
    prog.eval()
    expected = {"int8": ("bf16", 2), "fp32": ("fp32", 2), "onnx": (None, 0), "stock": (None, 0)}
    options = {"int8": {"int8": True}, "fp32": {}, "onnx": {"attention": "onnx"},
               "stock": {"int8": True, "target": "stock"}}
    for name, kw in options.items():
        path = tmp_path / f"{name}.onnx"
        result = prog.export_onnx(path, policy="always", measure=False, **kw)
        nodes = attention_op.attention_nodes(onnx.load(str(path)))
        compute, count = expected[name]
        assert len(nodes) == count, name
        assert all(helper.get_attribute_value(a).decode() == compute
                   for n in nodes for a in n.attribute if a.name == "compute")
        assert len(result.checks) == 4 and any(c.runtime.endswith("kernel") for c in result.checks), name
        assert (f"{count} Attention node(s)" in " ".join(result.notes)) == bool(count)
        if compute == "bf16":  # said where this CPU computes bf16 attention in fp32
            in_fp32 = library_isa(runtime.kernel_path(), bf16_attention=True) not in BF16_PATHS
            assert ("computed in fp32 on this CPU" in " ".join(result.notes)) == in_fp32, name
        # each layer's Q, K and V are one sparse node (fuse_qkv): 4 sparse nodes per layer instead of 6,
        # read packed by the kernel's Attention, split for ONNX's on the stock target; `onnx` keeps 6
        assert all(any(a.name == attention_op.PACKED for a in n.attribute) for n in nodes), name
        assert result.sparse_nodes == (12 if name == "onnx" else 8), name
        splits = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Split"]
        assert len(splits) == (2 if name == "stock" else 0), name
        assert (f"{count} of them read Q, K and V from one fused projection node" in " ".join(result.notes)) == bool(count)
