"""INT8 compute vs fp32 blocks vs dense onnxruntime, each engine alone in its own process.

    .venv/bin/python bench/int8.py [--threads 2] [--calls 200] [--rounds 3] [--bert DIR]

Single linear y = x @ W^T + b, x [128, 768], W [3072, 768] with 10% of its 32x32 blocks kept
(random, rows unbalanced), engines:
  dense          onnxruntime MatMul + Add on the dense weight (fp32)
  dense-qdyn     onnxruntime's quantize_dynamic of that dense model (INT8, per tensor)
  fp32-kernel    sparsec's file, fp32 blocks, native kernel
  int8-kernel    sparsec's file, INT8 compute (compute="int8"), native kernel
  int8-stock     the same INT8 file on stock onnxruntime (function body: MatMulInteger)
`--bert DIR` adds BERT-base seq 128 batch 1 from `bench/deploy_bert.py --out DIR` (bert.dense.onnx,
bert.onnx, bert.int8.onnx; encoder linears at density 0.1 in 32x32 blocks).

Each (engine, round) is one fresh process that builds its session, warms up, times `--calls` calls
one by one and reports their median; processes alternate engines round by round, so machine noise
hits all. The table gives the median over rounds of those medians, and ratios to dense.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

N, K, ROWS, DENSITY, BLOCK = 3072, 768, 128, 0.1, (32, 32)
LINEAR_ENGINES = ("dense", "dense-qdyn", "fp32-kernel", "int8-kernel", "int8-stock")
BERT_ENGINES = ("dense", "dense-qdyn", "fp32-kernel", "int8-kernel")


def linear_models(out: Path) -> dict[str, Path]:
    """The single-layer models (same weights for all engines), written once."""
    from sparsec.lowering import onnx_op
    from sparsec.lowering.block_format import pack, random_keep, unpack

    rng = np.random.default_rng(0)
    keep = random_keep(N, K, BLOCK, DENSITY, seed=0)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    fp32 = pack(w, keep, BLOCK)
    int8 = pack(w, keep, BLOCK, int8=True, per_row=True)
    paths = {"dense": out / "linear.dense.onnx", "fp32": out / "linear.onnx", "int8": out / "linear.int8.onnx"}
    for key, model in (("dense", onnx_op.dense_layer_model(unpack(fp32), bias)),
                       ("fp32", onnx_op.single_layer_model(fp32, bias)),
                       ("int8", onnx_op.single_layer_model(int8, bias))):
        paths[key].write_bytes(model.SerializeToString())
    return paths


def quantized_dense(dense: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = dense.with_name(dense.stem + ".qdyn.onnx")
    if not out.exists():
        # MatMul/Gemm only: the opset-23 Attention node would become a QAttention onnxruntime rejects
        quantize_dynamic(str(dense), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


def model_for(engine: str, files: dict[str, Path]) -> Path:
    return {"dense": files["dense"], "dense-qdyn": quantized_dense(files["dense"]), "fp32-kernel": files["fp32"],
            "int8-kernel": files["int8"], "int8-stock": files["int8"]}[engine]


def child(engine: str, path: Path, threads: int, calls: int) -> dict:
    """Runs in its own process: one session, `calls` timed calls, their median."""
    import onnxruntime as ort

    from sparsec import runtime

    if engine.endswith("kernel"):
        sess = runtime.session(str(path), threads=threads)
    else:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {}
    rng = np.random.default_rng(1)
    for i in sess.get_inputs():
        if i.type == "tensor(int64)":
            feeds[i.name] = (rng.integers(0, 30000, (1, 128)) if "ids" in i.name else np.ones((1, 128))).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal((ROWS, K)).astype(np.float32)
    y = sess.run(None, feeds)[0]
    for _ in range(max(5, calls // 10)):
        sess.run(None, feeds)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "best_s": min(times), "out": np.asarray(y, np.float64).ravel()[:2048].tolist()}


def spawn(engine: str, path: Path, args: argparse.Namespace, calls: int) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--model", str(path), "--threads", str(args.threads),
           "--calls", str(calls)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(title: str, engines: tuple[str, ...], files: dict[str, Path], args: argparse.Namespace, calls: int
          ) -> list[str]:
    medians: dict[str, list[float]] = {e: [] for e in engines}
    outs: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for engine in engines:
            result = spawn(engine, model_for(engine, files), args, calls)
            medians[engine].append(result["median_s"])
            outs[engine] = np.asarray(result["out"])
    dense = statistics.median(medians["dense"])
    scale = float(np.abs(outs["dense"]).max())
    lines = [title, "| engine | median ms (per-process medians) | vs dense | max abs error vs dense / output scale |",
             "|---|---|---|---|"]
    for engine in engines:
        t = statistics.median(medians[engine])
        spread = ", ".join(f"{m * 1e3:.3f}" for m in medians[engine])
        err = float(np.abs(outs[engine] - outs["dense"]).max()) / scale
        lines.append(f"| {engine} | {t * 1e3:.3f} ({spread}) | {dense / t:.2f}x | {err:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="timed calls per process (BERT: a tenth)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per engine")
    parser.add_argument("--bert", default=None, help="directory written by bench/deploy_bert.py --out")
    parser.add_argument("--no-linear", action="store_true", help="skip the single-layer table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.model), args.threads, args.calls)))
        return
    from sparsec import runtime
    from sparsec.runtime.build import library_isa

    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}")
    library = runtime.kernel_path()
    if library is None:
        raise SystemExit(f"kernel unavailable: {runtime.unavailable_reason()}")
    print(f"kernel: {library} (fp32 {library_isa(library)}, INT8 {library_isa(library, int8=True)})")
    if not args.no_linear:
        with tempfile.TemporaryDirectory(prefix="sparsec-int8-") as tmp:
            files = linear_models(Path(tmp))
            print("\n".join(table(f"\none linear x [{ROWS}, {K}] @ W^T + b, W [{N}, {K}], {BLOCK[0]}x{BLOCK[1]} blocks at "
                                  f"density {DENSITY} (random), {args.threads} threads, {args.rounds} processes per "
                                  f"engine x {args.calls} calls", LINEAR_ENGINES, files, args, args.calls)))
    if args.bert:
        d = Path(args.bert)
        files = {"dense": d / "bert.dense.onnx", "fp32": d / "bert.onnx", "int8": d / "bert.int8.onnx"}
        calls = max(10, args.calls // 10)
        print("\n".join(table(f"\nBERT-base seq 128 batch 1, encoder linears at density 0.1 in 32x32 blocks, "
                              f"{args.threads} threads, {args.rounds} processes per engine x {calls} calls",
                              BERT_ENGINES, files, args, calls)))


if __name__ == "__main__":
    main()
