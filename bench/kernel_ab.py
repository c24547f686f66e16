"""Two builds of sparsec's kernel library on one layer, in one process, calls alternating.

    .venv/bin/python -m sparsec.runtime.build          # prints the library of the current sources
    # change the sources, build again, then:
    .venv/bin/python bench/kernel_ab.py --a OLD.so --b NEW.so [--block 16x16] [--shape 3072x768]
                                        [--rows 128] [--density 0.1] [--int8] [--threads 1] [--calls 300]
    .venv/bin/python bench/kernel_ab.py --a OLD.so --b NEW.so --conv 64,64,3,56,1 [--block 32x32]
    .venv/bin/python bench/kernel_ab.py --a OLD.so --b NEW.so --model sparse.onnx --feeds feeds.npz
    .venv/bin/python bench/kernel_ab.py --a LIB.so --b LIB.so --model OLD.onnx --model-b NEW.onnx --feeds feeds.npz
    .venv/bin/python bench/kernel_ab.py --stock --model OLD.onnx --model-b NEW.onnx --feeds feeds.npz

For kernel changes on a shared or noisy machine: timing each build in its own process (as
bench/peers.py does between engines) compares two different moments of the machine, while here
both sessions see the same load, call after call (the order alternates every call). With one
thread neither session keeps a pool; with more, both pools are told not to spin (each call then
pays a thread wake-up, so absolute times are above a deployed session's). Both outputs are compared (the builds must agree to
`--tolerance` of the output scale, 1e-5 unless a build changes the arithmetic, as a bf16 path does)
and the medians printed. The layer is y = x @ W^T + b, W [N, K] with
`--density` of its blocks kept at random; with `--conv IN,OUT,KERNEL,SIZE,STRIDE` it is a
BlockSparseConv instead (padding KERNEL // 2, one image [1, IN, SIZE, SIZE], W [OUT, IN*KERNEL^2]).
With `--model` a whole exported file is timed (e.g. the sparse.onnx and feeds.npz that
`bench/peers.py --out DIR` leaves), which is where the weights come cold from memory: a BERT-base
streams 35 MB of packed weights per inference, a single layer keeps its own in cache. With
`--model-b`, build b runs that file instead: two exports of one model (a lowering change) on one
build, timed the same way; with `--stock` as well, stock onnxruntime runs both (no build).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pair(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected two positive sizes like 32x32")
    return int(parts[0]), int(parts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, help="one build of libsparsec_ort.so")
    parser.add_argument("--b", type=Path, help="the other build")
    parser.add_argument("--stock", action="store_true",
                        help="no build: stock onnxruntime runs both (with --model and --model-b: two exports)")
    parser.add_argument("--block", type=pair, default=(32, 32))
    parser.add_argument("--shape", type=pair, default=(3072, 768), help="N x K of the weight")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--int8", action="store_true", help="INT8 compute (int8 weights, one scale per row)")
    parser.add_argument("--activation", default="", choices=("", "gelu", "gelu_tanh", "relu"),
                        help="the epilogue activation of the layer built here (a convolution: relu only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--conv", default="", help="IN,OUT,KERNEL,SIZE,STRIDE: time a convolution instead")
    parser.add_argument("--model", type=Path, default=None, help="time this ONNX file instead (with --feeds)")
    parser.add_argument("--model-b", type=Path, default=None,
                        help="with --model: the file build b runs (another export of the same model)")
    parser.add_argument("--feeds", type=Path, default=None, help=".npz of the model's inputs, by name")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest difference between the builds' outputs, relative to the output scale")
    args = parser.parse_args()
    if args.stock and (args.a or args.b or args.model_b is None):
        parser.error("--stock compares two files (--model, --model-b) without a build (no --a, --b)")
    if not args.stock and (args.a is None or args.b is None):
        parser.error("--a and --b are required (or --stock)")
    for lib in () if args.stock else (args.a, args.b):
        if not lib.is_file():
            parser.error(f"{lib}: no such library")
    if (args.model is None) != (args.feeds is None):
        parser.error("--model and --feeds go together")
    if args.model_b is not None and args.model is None:
        parser.error("--model-b needs --model")
    if args.activation and args.model is not None:
        parser.error("--activation applies to the layer built here, not to --model")
    if args.activation not in ("", "relu") and args.conv:
        parser.error(f"--activation {args.activation}: a convolution takes relu only")

    import onnxruntime as ort

    from sparsec.lowering import onnx_op
    from sparsec.lowering.block_format import pack, random_keep

    rng = np.random.default_rng(0)
    if args.model is not None:
        model, what = str(args.model), f"model {args.model}" + (f" (b: {args.model_b})" if args.model_b else "")
        with np.load(args.feeds) as data:
            feeds = {name: data[name] for name in data.files}
    elif args.conv:
        from sparsec.lowering import conv_op

        c_in, n, kernel, size, stride = (int(v) for v in args.conv.split(","))
        k, pad = c_in * kernel * kernel, kernel // 2
        x = rng.standard_normal((1, c_in, size, size)).astype(np.float32)
        what = f"conv {c_in}->{n} {kernel}x{kernel} stride {stride} on {size}x{size}"
    else:
        (n, k), x = args.shape, rng.standard_normal((args.rows, args.shape[1])).astype(np.float32)
        what = f"W {n}x{k}, {args.rows} rows"
    if args.model is None:
        keep = random_keep(n, k, args.block, args.density, seed=0)
        weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32)
        feeds = {"x": x}
        if args.conv:
            geometry = [kernel, kernel, stride, stride, pad, pad, pad, pad, 1, 1]
            model = conv_op.single_layer_model(pack(weight, keep, args.block), geometry, list(x.shape),
                                               bias, activation=args.activation).SerializeToString()
        else:
            packed = pack(weight, keep, args.block, int8=True, per_row=True) if args.int8 else pack(weight, keep, args.block)
            model = onnx_op.single_layer_model(packed, bias, activation=args.activation).SerializeToString()
    sessions = {}
    for name, lib in (("a", args.a), ("b", args.b)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        if args.threads > 1:  # two spinning pools in one process would take each other's cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if lib is not None:
            options.register_custom_ops_library(str(lib))
        file = str(args.model_b) if name == "b" and args.model_b is not None else model
        sessions[name] = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    out_a, out_b = (sessions[s].run(None, feeds)[0] for s in ("a", "b"))
    scale = float(np.abs(out_a).max()) or 1.0
    error = float(np.abs(out_a - out_b).max()) / scale
    if not error <= args.tolerance:
        raise SystemExit(f"the builds disagree: max difference {error:.1e} of the output scale")
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(args.calls):
        for name in ("a", "b") if i % 2 == 0 else ("b", "a"):
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - start)
    a, b = (statistics.median(times[s]) * 1e3 for s in ("a", "b"))
    layer = "" if args.model is not None else f"{args.block[0]}x{args.block[1]} blocks, density {args.density}, "
    layer += "INT8, " if args.int8 else ""
    layer += f"{args.activation}, " if args.activation else ""
    print(f"{what}, {layer}{args.threads} thread(s), {args.calls} calls each: a {a:.3f} ms, b {b:.3f} ms, b/a {b / a:.3f} "
          f"(outputs agree to {error:.1e})")


if __name__ == "__main__":
    main()
