"""Deployment speed and size: block-sparse ONNX vs dense onnxruntime.

    .venv/bin/python bench/deploy.py [--case NAME ...] [--threads 2] [--repeats 200]
    .venv/bin/python bench/deploy.py --list

Single-layer cases time one linear y = x @ W^T + b, W [3072, 768] with 10% of its blocks kept, three
ways in the same process: dense onnxruntime (MatMul + Add on the dense weight), the sparse file on
stock onnxruntime (the op's ONNX function body is inlined), and the sparse file with sparsec's native
kernel registered. Sessions spin-wait as onnxruntime does by default, so every timed call or burst
follows a pause that lets the other sessions' pool threads park (sparsec.bench.SETTLE_S). Two
protocols, medians: interleaved, one timed call each after 5 ms of untimed calls
(sparsec.bench.interleaved), and back to back in rotating bursts (caches warm, as for a layer
inside a model). Target (DESIGN.md): kernel >= 9x dense for 32x32 blocks and 128 rows. `sizes`
compares the file size of the single-layer models.

Adding a case: write a function taking the parsed args and returning printable lines, and register
it with @case("name", "one-line description").
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median  # noqa: E402

from sparsec import runtime  # noqa: E402
from sparsec.bench import SETTLE_S, kernel_session, stock_session, timing_protocol  # noqa: E402
from sparsec.lowering import onnx_op  # noqa: E402
from sparsec.lowering.block_format import pack, random_keep, reference, unpack  # noqa: E402

CASES: dict[str, tuple[str, Callable[[argparse.Namespace], list[str]]]] = {}
N, K, DENSITY = 3072, 768, 0.1


def case(name: str, description: str):
    def register(fn: Callable[[argparse.Namespace], list[str]]):
        CASES[name] = (description, fn)
        return fn
    return register


def sparse_layer(block: tuple[int, int], balanced: bool, int8: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    keep = random_keep(N, K, block, DENSITY, seed=seed, balanced=balanced)
    w = rng.standard_normal((N, K)).astype(np.float32) / np.sqrt(K)
    bias = rng.standard_normal(N).astype(np.float32)
    return pack(w, keep, block, int8=int8), bias


def time_linear(args: argparse.Namespace, rows: int, block: tuple[int, int], balanced: bool) -> list[str]:
    packed, bias = sparse_layer(block, balanced)
    dense_model = onnx_op.dense_layer_model(unpack(packed), bias).SerializeToString()
    sparse_model = onnx_op.single_layer_model(packed, bias).SerializeToString()
    sessions = {"dense onnxruntime": stock_session(dense_model, args.threads),
                "function body (stock onnxruntime)": stock_session(sparse_model, args.threads)}
    if runtime.kernel_available():
        sessions["sparsec kernel"] = kernel_session(sparse_model, args.threads)[0]
    x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    expected = reference(x, packed, bias)
    for name, sess in sessions.items():
        err = float(np.abs(sess.run(None, {"x": x})[0] - expected).max())
        if err > 1e-3:
            raise SystemExit(f"{name}: max abs error {err:.3g} vs the numpy reference")
    repeats = args.repeats * (5 if rows == 1 else 1)
    calls = {name: (lambda s=sess: s.run(None, {"x": x})) for name, sess in sessions.items()}
    cold = interleaved(calls, repeats=repeats, warmup=10, settle=SETTLE_S)
    warm = back_to_back(calls, repeats=repeats)
    kept = packed.row_nnz
    lines = [f"x [{rows}, {K}] @ W^T, W [{N}, {K}], {block[0]}x{block[1]} blocks, density {packed.density:.3f} "
             f"({'balanced' if balanced else 'random'}: {kept.min()}..{kept.max()} blocks per block row), "
             f"{timing_protocol(args.threads)}, {repeats} runs each, medians (best in brackets)",
             f"  {'':34s} {'interleaved, one call each':>36s}   {'back to back, in bursts':>36s}"]
    for name in calls:
        cells = []
        for times in (cold, warm):
            t, best, base = median(times[name]), min(times[name]), median(times["dense onnxruntime"])
            cells.append(f"{t * 1e3:8.3f} ms {base / t:6.2f}x ({best * 1e3:7.3f} ms)")
        lines.append(f"  {name:34s} {cells[0]:>36s}   {cells[1]:>36s}")
    return lines


def back_to_back(calls: dict[str, Callable[[], object]], repeats: int, rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per call, each variant called repeats/rounds times in a row (caches stay warm, as for
    a layer inside a model), the bursts rotating between variants so that machine noise hits all,
    each after a pause (SETTLE_S) and one untimed call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    per_burst = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in calls.items():
            time.sleep(SETTLE_S)  # the previous burst's pool threads stop spinning
            fn()
            for _ in range(per_burst):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


@case("linear-32x32", "128 rows, 32x32 random blocks (target: kernel >= 9x dense)")
def linear_32(args):
    return time_linear(args, 128, (32, 32), balanced=False)


@case("linear-32x32-balanced", "128 rows, 32x32 blocks, equal count per block row")
def linear_32_balanced(args):
    return time_linear(args, 128, (32, 32), balanced=True)


@case("linear-16x16", "128 rows, 16x16 random blocks")
def linear_16(args):
    return time_linear(args, 128, (16, 16), balanced=False)


@case("linear-32x32-row1", "1 row (decoding), 32x32 random blocks")
def linear_32_row1(args):
    return time_linear(args, 1, (32, 32), balanced=False)


@case("linear-16x16-row1", "1 row (decoding), 16x16 random blocks")
def linear_16_row1(args):
    return time_linear(args, 1, (16, 16), balanced=False)


@case("sizes", "file size of the single-layer model: dense vs fp32 blocks vs INT8 blocks")
def sizes(args):
    lines = [f"single-layer model W [{N}, {K}] + bias, density {DENSITY}, serialized ONNX bytes"]
    for block in ((32, 32), (16, 16)):
        packed, bias = sparse_layer(block, balanced=False)
        packed_q, _ = sparse_layer(block, balanced=False, int8=True)
        dense = len(onnx_op.dense_layer_model(unpack(packed), bias).SerializeToString())
        fp32 = len(onnx_op.single_layer_model(packed, bias).SerializeToString())
        int8 = len(onnx_op.single_layer_model(packed_q, bias).SerializeToString())
        padded = len(onnx_op.single_layer_model(packed, bias, compact=False).SerializeToString())
        lines.append(f"  {block[0]}x{block[1]}: dense {dense / 1e6:7.3f} MB   fp32 blocks {fp32 / 1e6:7.3f} MB "
                     f"({dense / fp32:5.2f}x smaller)   INT8 blocks {int8 / 1e6:7.3f} MB ({dense / int8:5.2f}x smaller)"
                     f"   [fp32 with padding slots stored: {padded / 1e6:.3f} MB, {dense / padded:.2f}x]")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="run only these (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=200, help="interleaved rounds (x5 for 1-row cases)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (description, _) in CASES.items():
            print(f"{name:24s} {description}")
        return
    warnings.simplefilter("default", runtime.KernelUnavailableWarning)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}, onnxruntime {ort.__version__}")
    if runtime.kernel_available():
        from sparsec.runtime.build import library_isa

        print(f"kernel: {runtime.kernel_path()} ({library_isa(runtime.kernel_path())})")
    else:
        print(f"kernel: unavailable ({runtime.unavailable_reason()})")
    for name in args.case or list(CASES):
        print(f"\n[{name}]")
        for line in CASES[name][1](args):
            print(line)


if __name__ == "__main__":
    main()
