"""Crafted BlockSparseLinear, BlockSparseConv and Attention nodes against the native kernel, run in a
process of its own.

    LD_PRELOAD=<libasan>:<libubsan> ASAN_OPTIONS=detect_leaks=0 SPARSEC_KERNEL_LIB=<sanitized lib> \
        python tests/kernel_fuzz.py

tests/test_kernel_sanitized.py builds the AddressSanitizer/UBSan library and runs this file under it:
every malformed node (attributes, shapes, types, indices; at session creation and, for weights fed
as graph inputs, at each run) must end in an onnxruntime error naming what is wrong, and every valid
node must match the numpy reference on every instruction set, with no sanitizer report. A memory or
undefined-behaviour error aborts the process (the test sees its report); a wrong answer or a missing
error prints a FAIL line and exits 1.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from sparsec import runtime
from sparsec.lowering import onnx_op
from sparsec.lowering.block_format import PackedBlocks, int8_reference, pack, random_keep, reference, unpack
from sparsec.runtime.build import library_isa
from test_runtime_kernel import epilogue_reference  # tests/ is sys.path[0] when run as a script

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@dataclass
class Layer:
    """The arrays and attributes of one node; the fuzz cases edit them before the model is made."""

    values: np.ndarray
    block_cols: np.ndarray
    row_nnz: np.ndarray
    n: int
    k: int
    scales: np.ndarray | None = None
    bias: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)
    fed: tuple[str, ...] = ()  # these weight inputs are graph inputs, fed at run time
    residual: bool = False
    layer_norm: tuple[np.ndarray, np.ndarray] | None = None
    skip_ln_scale: bool = False
    int8_compute: bool = False  # compute="int8": per-row scales [N], activations quantized in the kernel


def layer(n: int = 70, k: int = 45, block: tuple[int, int] = (16, 16), density: float = 0.4, *,
          int8: bool | str = False, seed: int = 0) -> Layer:
    """`int8`: True for int8 storage (per-block scales), "compute" for INT8 compute (per-row)."""
    rng = np.random.default_rng(seed)
    keep = random_keep(n, k, block, density, seed=seed)
    keep[0] = False  # an empty block row
    keep[-1] = True  # a full one, also cut by N when it does not divide
    w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
    p = pack(w, keep, block, int8=bool(int8), per_row=int8 == "compute")
    return Layer(p.values, p.block_cols, p.row_nnz, n, k, p.scales, rng.standard_normal(n).astype(np.float32),
                 int8_compute=int8 == "compute")


def model_of(lay: Layer) -> onnx.ModelProto:
    arrays = {"W.values": lay.values, "W.block_cols": lay.block_cols, "W.row_nnz": lay.row_nnz}
    if lay.scales is not None:
        arrays["W.scales"] = lay.scales
    if lay.bias is not None:
        arrays["bias"] = lay.bias
    ln = None
    if lay.layer_norm is not None:
        arrays["ln.scale"], arrays["ln.bias"] = lay.layer_norm
        ln = ("" if lay.skip_ln_scale else "ln.scale", "ln.bias", 1e-5)
    node = onnx_op.make_node("x", "W.values", "W.block_cols", "W.row_nnz", "y", lay.n, lay.k,
                             bias="bias" if lay.bias is not None else None,
                             scales="W.scales" if lay.scales is not None else None,
                             residual="r" if lay.residual else None, layer_norm=ln, name="fuzzed")
    if lay.int8_compute and "compute" not in lay.attrs:  # as an attribute: the kernel sees any inputs
        node.attribute.append(helper.make_attribute("compute", "int8"))
    for attr in list(node.attribute):
        if attr.name in lay.attrs:
            node.attribute.remove(attr)
    for name, value in lay.attrs.items():
        node.attribute.append(helper.make_attribute(name, value))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]  # no shape: runs see anything
    if lay.residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    inits = []
    for name, array in arrays.items():
        if name in lay.fed:
            dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
            inputs.append(helper.make_tensor_value_info(name, dtype, None))
        else:
            inits.append(numpy_helper.from_array(array, name))
    graph = helper.make_graph([node], "fuzz", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                    helper.make_opsetid(onnx_op.DOMAIN, 1)])
    model.ir_version = onnx_op.IR_VERSION
    return model


def run(lay: Layer, x: np.ndarray, r: np.ndarray | None = None, threads: int = 2) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.KernelUnavailableWarning)
        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # each tensor its own allocation: ASan sees past its end
        sess = runtime.session(model_of(lay).SerializeToString(), threads=threads, options=options)
    feeds = {"x": x}
    if r is not None:
        feeds["r"] = r
    named = {"W.values": lay.values, "W.block_cols": lay.block_cols, "W.row_nnz": lay.row_nnz,
             "W.scales": lay.scales, "bias": lay.bias}
    feeds.update({name: named[name] for name in lay.fed})
    return sess.run(None, feeds)[0]


def x_for(lay: Layer, rows: int = 5, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, lay.k)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# malformed nodes: (name, edit of a valid layer, the error expected)

def _set(**attrs) -> Callable[[Layer], None]:
    return lambda lay: lay.attrs.update(attrs)


def _arr(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[Layer], None]:
    return lambda lay: setattr(lay, name, fn(getattr(lay, name)))


def _cols(value: int, r: int = -1, s: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    def edit(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[r, s] = value
        return a
    return edit


def _nnz(value: int, r: int = -1) -> Callable[[np.ndarray], np.ndarray]:
    def edit(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a[r] = value
        return a
    return edit


def _extra_slot(lay: Layer) -> None:
    lay.values = np.concatenate([lay.values, lay.values[:, :1]], axis=1)
    lay.block_cols = np.concatenate([lay.block_cols, lay.block_cols[:, :1]], axis=1)
    if lay.scales is not None:
        lay.scales = np.concatenate([lay.scales, lay.scales[:, :1]], axis=1)


def _huge_block(lay: Layer) -> None:
    lay.n, lay.k = 5000, 2
    lay.values = np.zeros((1, 1, 5000, 2), lay.values.dtype)
    lay.block_cols = np.zeros((1, 1), np.int64)
    lay.row_nnz = np.ones(1, np.int64)
    lay.bias = None
    if lay.scales is not None:
        lay.scales = np.ones(5000 if lay.int8_compute else (1, 1), np.float32)


def _no_scales(lay: Layer) -> None:
    lay.scales = None


def _ln_without_scale(lay: Layer) -> None:
    lay.layer_norm = (np.ones(lay.n, np.float32), np.zeros(lay.n, np.float32))
    lay.skip_ln_scale = True


MALFORMED: list[tuple[str, Callable[[Layer], None], str]] = [
    ("N = INT64_MAX", _set(N=INT64_MAX), "attributes N and K"),
    ("K = INT64_MAX", _set(K=INT64_MAX), "attributes N and K"),
    ("N = 0", _set(N=0), "attributes N and K"),
    ("K < 0", _set(K=-16), "attributes N and K"),
    ("N = INT64_MIN", _set(N=INT64_MIN), "attributes N and K"),
    ("N = 2^40 + 1", _set(N=2**40 + 1), "attributes N and K"),
    ("N off by a block row", _set(N=70 + 16), "block rows"),
    ("K larger than the blocks cover", _set(K=4500), "X must be|slots per block row|block_cols"),
    ("epsilon NaN", _set(epsilon=float("nan")), "epsilon"),
    ("epsilon < 0", _set(epsilon=-1.0), "epsilon"),
    ("unknown activation", _set(activation="swish"), "unknown activation"),
    ("activation with a NUL", _set(activation="gelu\0x"), "unknown activation"),
    ("block 5000 x 2", _huge_block, "block shape"),
    ("one slot too many", _extra_slot, "slots per block row"),
    ("values rank 3", _arr("values", lambda a: a.reshape(a.shape[0], -1, a.shape[3])), r"values must be \[R, S, BR, BC\]"),
    ("values float64", _arr("values", lambda a: a.astype(np.float64)), "(?i)float32|type"),
    ("values int32", _arr("values", lambda a: a.astype(np.int32)), "(?i)float32|type"),
    ("block_cols int32", _arr("block_cols", lambda a: a.astype(np.int32)), "(?i)type|int64"),
    ("block_cols wrong shape", _arr("block_cols", lambda a: a[:, :-1]), "block_cols must be"),
    ("block_cols negative", _arr("block_cols", _cols(-1)), "block_cols"),
    ("block_cols past K", _arr("block_cols", _cols(3)), "block_cols"),
    ("block_cols INT64_MAX", _arr("block_cols", _cols(INT64_MAX)), "block_cols"),
    ("block_cols INT64_MIN", _arr("block_cols", _cols(INT64_MIN)), "block_cols"),
    ("block_cols repeated in a row", _arr("block_cols", lambda a: np.concatenate([a[:, :1], a[:, :-1]], axis=1)),
     "must ascend"),
    ("row_nnz > S", _arr("row_nnz", _nnz(4)), "row_nnz"),
    ("row_nnz negative", _arr("row_nnz", _nnz(-1)), "row_nnz"),
    ("row_nnz INT64_MAX", _arr("row_nnz", _nnz(INT64_MAX)), "row_nnz"),
    ("row_nnz INT64_MIN", _arr("row_nnz", _nnz(INT64_MIN, 0)), "row_nnz"),
    ("row_nnz wrong length", _arr("row_nnz", lambda a: a[:-1]), "row_nnz must be"),
    ("bias wrong length", _arr("bias", lambda a: a[:-1]), "bias must be"),
    ("ln_bias without ln_scale", _ln_without_scale, "ln_bias needs ln_scale|ln_scale"),
]
MALFORMED_INT8: list[tuple[str, Callable[[Layer], None], str]] = [
    ("int8 without scales", _no_scales, "int8 values need the scales"),
    ("scales wrong shape", _arr("scales", lambda a: a[:, :-1]), "scales must be"),
    ("scales float64", _arr("scales", lambda a: a.astype(np.float64)), "(?i)scales must be|type"),
]


def _per_block_scales(lay: Layer) -> None:
    lay.scales = np.ones(lay.block_cols.shape, np.float32)


def _float_values(lay: Layer) -> None:
    lay.values = lay.values.astype(np.float32)


def _k_too_long(lay: Layer) -> None:
    lay.n, lay.k = 3, (1 << 16) + 8
    lay.values = np.ones((1, 17, 3, 4096), np.int8)
    lay.block_cols = np.arange(17, dtype=np.int64)[None, :]
    lay.row_nnz = np.full(1, 17, np.int64)
    lay.scales, lay.bias = np.ones(3, np.float32), None


MALFORMED_INT8_COMPUTE: list[tuple[str, Callable[[Layer], None], str]] = [
    ("compute int8 without scales", _no_scales, "int8 values need the scales"),
    ("compute int8, scales per block", _per_block_scales, r"compute=int8 needs scales float \[N"),
    ("compute int8, scales one short", _arr("scales", lambda a: a[:-1]), r"compute=int8 needs scales float \[N"),
    ("compute int8, scales float64", _arr("scales", lambda a: a.astype(np.float64)), "(?i)scales|type"),
    ("compute int8, float values", _float_values, "compute=int8 needs int8 values"),
    ("compute int4", _set(compute="int4"), "unknown compute"),
    ("compute int8, K > 2^16", _k_too_long, "K <= 65536"),
]
RUN_TIME: list[tuple[str, Callable[[Layer], np.ndarray], str]] = [
    ("X wrong width", lambda lay: x_for(lay)[:, :-1], "X must be"),
    ("X a scalar", lambda lay: np.array(1.0, dtype=np.float32), "X must be"),
    ("X float64", lambda lay: x_for(lay).astype(np.float64), "(?i)type|float"),
]


def expect_error(name: str, fn: Callable[[], object], pattern: str, failures: list[str]) -> None:
    try:
        fn()
    except Exception as err:  # onnxruntime's Fail / InvalidArgument / InvalidGraph
        if not re.search(pattern, str(err)):
            failures.append(f"{name}: error does not match /{pattern}/: {str(err).splitlines()[0][:300]}")
        return
    failures.append(f"{name}: no error")


def malformed_cases(failures: list[str]) -> int:
    count = 0
    for int8, cases in ((False, MALFORMED), (True, MALFORMED + MALFORMED_INT8),
                        ("compute", MALFORMED + MALFORMED_INT8_COMPUTE)):
        for fed in ((), ("W.values", "W.block_cols", "W.row_nnz", "W.scales", "bias")):
            for name, edit, pattern in cases:
                lay = layer(int8=int8)
                if not int8 and "scales" in name or name == "one slot too many" and int8 == "compute":
                    continue
                lay.fed = tuple(f for f in fed if f != "W.scales" or int8)
                edit(lay)
                lay.fed = tuple(f for f in lay.fed if (f != "W.scales" or lay.scales is not None)
                                and (f != "bias" or lay.bias is not None))
                kind = {False: "fp32", True: "int8", "compute": "int8 compute"}[int8]
                if int8 == "compute":  # the compute mode's own checks may speak first
                    pattern = f"{pattern}|compute=int8 needs"
                label = f"{name} ({kind}, weights {'fed' if fed else 'constant'})"
                expect_error(label, lambda: run(lay, x_for(lay)), pattern, failures)
                count += 1
    for name, make_x, pattern in RUN_TIME:
        lay = layer()
        expect_error(name, lambda: run(lay, make_x(lay)), pattern, failures)
        count += 1
    lay = layer()
    lay.residual = True
    expect_error("residual wrong shape", lambda: run(lay, x_for(lay), x_for(lay)[:, :3]), "residual must be", failures)
    return count + 1


# ------------------------------------------------------------------------------------------------
# valid nodes on every instruction set

VALID = [((70, 45), (16, 16)), ((96, 128), (32, 32)), ((90, 1024), (16, 16)), ((70, 2048), (16, 32)),
         ((300, 45), (128, 8)), ((33, 17), (1, 1)), ((40, 40), (40, 40)), ((70, 45), (16, 1)),
         ((50, 100), (1, 16)), ((40, 30), (32, 4)), ((33, 50), (1, 8)), ((60, 77), (1, 32)),
         ((30, 43), (1, 12))]


def valid_cases(isa: str, failures: list[str]) -> int:
    os.environ["SPARSEC_KERNEL_ISA"] = isa
    count = 0
    for (n, k), block in VALID:
        for int8 in (False, True, "compute"):
            lay = layer(n, k, block, 0.35, int8=int8, seed=n + k)
            p = PackedBlocks(lay.values, lay.block_cols, lay.row_nnz, lay.scales, n, k)
            for fed in ((), ("W.values", "W.block_cols", "W.row_nnz")):
                lay.fed = fed
                for rows in (0, 1, 13, 49, 130):
                    for threads in (1, 2):
                        x = x_for(lay, rows, seed=rows)
                        got = run(lay, x, threads=threads)
                        want = int8_reference(x, p, lay.bias)[1] if int8 == "compute" else reference(x, p, lay.bias)
                        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                            failures.append(f"valid {n}x{k} {block} int8={int8} fed={bool(fed)} rows={rows} "
                                            f"threads={threads} isa={isa}: wrong result")
                        count += 1
        lay = layer(n, k, block, 0.35, seed=3)
        lay.residual, lay.attrs = True, {"activation": "gelu"}
        lay.layer_norm = (np.linspace(0.5, 1.5, n).astype(np.float32), np.full(n, 0.1, np.float32))
        p = PackedBlocks(lay.values, lay.block_cols, lay.row_nnz, None, n, k)
        x, r = x_for(lay, 7), 3 + np.random.default_rng(9).standard_normal((7, n)).astype(np.float32)
        want = epilogue_reference(x, p, lay.bias, "gelu", r, (*lay.layer_norm, 1e-5))
        got = run(lay, x, r)
        if not np.allclose(got, want, rtol=1e-3, atol=1e-3):
            failures.append(f"valid epilogue {n}x{k} {block} isa={isa}: wrong result")
        count += 1
    return count


# ------------------------------------------------------------------------------------------------
# convolutions: valid nodes (weights constant and fed) on every instruction set, malformed ones

CONVS = [  # (batch, C, H, W, O, kernel, stride, pads, dilation, block)
    (2, 8, 5, 7, 10, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (4, 4)),
    (1, 16, 9, 9, 33, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), (16, 1)),
    (3, 5, 11, 6, 13, (3, 2), (2, 1), (1, 0, 1, 0), (2, 1), (1, 1)),
    (1, 3, 17, 19, 24, (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), (8, 8)),
    (2, 48, 14, 14, 40, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), (32, 32)),
    (1, 6, 4, 4, 7, (3, 3), (1, 1), (2, 1, 0, 3), (2, 2), (1, 4)),
]


def conv_model(case, fed: bool, seed: int = 0, edit: Callable[[dict], None] | None = None, residual: bool = False):
    """A one-node BlockSparseConv model, its feeds and the expected output (None for `edit`ed ones);
    `residual`: a residual input and the ReLU epilogue, relu(conv + bias + residual)."""
    import torch

    b, c, h, w, o, (kh, kw), (sh, sw), pads, (dh, dw), block = case
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((o, c * kh * kw)).astype(np.float32)
    packed = pack(weight, random_keep(o, c * kh * kw, block, 0.35, seed=seed), block=block)
    arrays = {"v": packed.values, "c": packed.block_cols, "r": packed.row_nnz,
              "bias": rng.standard_normal(o).astype(np.float32)}
    attrs = {"N": o, "K": c * kh * kw, "kernel_shape": [kh, kw], "strides": [sh, sw], "pads": list(pads),
             "dilations": [dh, dw]}
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    spec = {"arrays": arrays, "attrs": attrs, "x": x}
    if edit is not None:
        edit(spec)
    arrays, attrs, x = spec["arrays"], spec["attrs"], spec["x"]
    names = ["x", "v", "c", "r", "bias"] + (["", "res"] if residual else [])
    if residual:
        attrs = {**attrs, "activation": "relu"}
    node = helper.make_node("BlockSparseConv", names, ["y"], domain="sparsec", **attrs)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)]
    inits, feeds = [], {"x": x}
    if residual:
        inputs.append(helper.make_tensor_value_info("res", TensorProto.FLOAT, None))
    for name, value in arrays.items():
        if fed:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), None))
            feeds[name] = value
        else:
            inits.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph([node], "conv", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_op.ONNX_OPSET),
                                                     helper.make_opsetid("sparsec", 1)])
    model.ir_version = onnx_op.IR_VERSION
    expected = None
    if edit is None:
        dense = torch.from_numpy(unpack(packed))
        padded = torch.nn.functional.pad(torch.from_numpy(x), (pads[1], pads[3], pads[0], pads[2]))
        expected = torch.nn.functional.conv2d(padded, dense.reshape(o, c, kh, kw), torch.from_numpy(arrays["bias"]),
                                              (sh, sw), 0, (dh, dw)).numpy()
        if residual:
            feeds["res"] = rng.standard_normal(expected.shape).astype(np.float32)
            expected = np.maximum(expected + feeds["res"], 0)
    return model, feeds, expected


def conv_session_run(model, feeds, threads: int = 2):
    session = runtime.session(model.SerializeToString(), threads=threads)
    return session.run(None, feeds)[0]


MALFORMED_CONV = [
    ("conv block_cols out of range", lambda s: s["arrays"]["c"].__setitem__((0, 0), 10**6), "block_cols\\["),
    ("conv row_nnz too large", lambda s: s["arrays"]["r"].__setitem__(0, 99), "row_nnz"),
    ("conv channels", lambda s: s.update(x=s["x"][:, :-1]), "channels"),
    ("conv K not a multiple", lambda s: s["attrs"].update(K=s["attrs"]["K"] + 1), "multiple of kh\\*kw|K="),
    ("conv huge pads", lambda s: s["attrs"].update(pads=[2**40, 0, 0, 0]), "pads must be"),
    ("conv negative stride", lambda s: s["attrs"].update(strides=[-1, 1]), "strides must be"),
    ("conv huge image", lambda s: s["attrs"].update(pads=[2**20, 2**20, 2**20, 2**20]), "too large"),
    ("conv bias length", lambda s: s["arrays"].update(bias=s["arrays"]["bias"][:-1]), "bias must be"),
    ("conv kernel larger than the image", lambda s: s["attrs"].update(pads=[0, 0, 0, 0], dilations=[9, 9]),
     "smaller than the dilated kernel"),
]


def conv_cases(isa: str | None, failures: list[str]) -> int:
    count = 0
    if isa is None:
        for name, edit, pattern in MALFORMED_CONV:
            for fed in (False, True):
                model, feeds, _ = conv_model(CONVS[0], fed, edit=edit)
                expect_error(f"{name} (weights {'fed' if fed else 'constant'})",
                             lambda: conv_session_run(model, feeds), pattern, failures)
                count += 1
        return count
    os.environ["SPARSEC_KERNEL_ISA"] = isa
    for i, case in enumerate(CONVS):
        for fed, residual in ((False, False), (True, False), (False, True)):
            for threads in (1, 2):
                model, feeds, expected = conv_model(case, fed, seed=i, residual=residual)
                got = conv_session_run(model, feeds, threads)
                if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-4):
                    failures.append(f"valid conv {case} fed={fed} residual={residual} threads={threads} isa={isa}: "
                                    "wrong result")
                count += 1
    return count


def attention_cases(isa: str | None, failures: list[str]) -> int:
    """sparsec::Attention: with `isa` None the malformed nodes and inputs, else every valid case in
    fp32 and bf16 against the float64 reference (where bf16 rounds, the reference rounds the same
    values: within 1e-3)."""
    import test_attention_kernel as att

    if isa is None:
        for attrs, change, pattern in att.BAD:
            expect_error(f"attention {pattern}", lambda: att.run_bad(attrs, change), pattern, failures)
        return len(att.BAD)
    os.environ["SPARSEC_KERNEL_ISA"] = isa
    # bf16 rounds its products on AMX tiles or with AVX512-BF16 (whichever this CPU has under the cap)
    bf16_rounds = library_isa(os.environ["SPARSEC_KERNEL_LIB"], bf16_attention=True) in att.BF16_PATHS
    count = 0
    for shape, mshape, kind, causal in att.CASES:
        f, mask = att.case_inputs(shape, mshape, kind)
        for compute in ("fp32", "bf16"):
            rounded = compute == "bf16" and bf16_rounds
            want = att.reference(f, shape, mask, causal, bf16_products=rounded)
            tolerance = 1e-3 if rounded else 2e-5
            for threads in (1, 2):
                data = att.model("sparsec", *shape, mask, compute=compute, is_causal=causal)
                got = att.session(data, kernel=True, threads=threads).run(None, f)[0]
                if got.shape != want.shape or not np.allclose(got, want, atol=tolerance, rtol=0):
                    failures.append(f"attention {shape} {compute} threads={threads} isa={isa}: wrong result")
                count += 1
    for shape, mshape, kind, causal in att.PACKED_CASES:   # Q, K, V read in place from one tensor
        f, mask = att.case_inputs(shape, mshape, kind)
        for compute in ("fp32", "bf16"):
            rounded = compute == "bf16" and bf16_rounds
            want = att.reference(f, shape, mask, causal, bf16_products=rounded)
            data = att.model("sparsec", *shape, mask, compute=compute, packed=True, is_causal=causal)
            got = att.session(data, kernel=True, threads=2).run(None, att.packed_feeds(f))[0]
            if got.shape != want.shape or not np.allclose(got, want, atol=1e-3 if rounded else 2e-5, rtol=0):
                failures.append(f"packed attention {shape} {compute} isa={isa}: wrong result")
            count += 1
    return count


def main() -> int:
    if not os.environ.get("SPARSEC_KERNEL_LIB"):
        print("set SPARSEC_KERNEL_LIB to the library to fuzz", file=sys.stderr)
        return 2
    ort.set_default_logger_severity(4)  # the expected errors come back as exceptions; no log lines
    maps = open("/proc/self/maps").read()
    print("sanitizers:", "on" if "libasan" in maps and "libubsan" in maps else "off")
    failures: list[str] = []
    count = malformed_cases(failures) + conv_cases(None, failures) + attention_cases(None, failures)
    for isa in ("amx", "avx512", "avx2", "scalar"):  # amx: INT8 compute's and bf16 attention's tiles
        count += valid_cases(isa, failures) + (conv_cases(isa, failures) if isa != "amx" else 0) + \
            attention_cases(isa, failures)
    for line in failures:
        print("FAIL", line)
    print(f"{count} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
