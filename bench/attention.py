"""One Attention node: onnxruntime's own against sparsec's kernel in fp32 and in bf16, in one process.

    .venv/bin/python bench/attention.py [--shape 1,128,128,12,12,64,64] [--threads 1] [--calls 400]

`--shape` is B, Sq, Skv, Hq, Hkv, D, Dv (BERT-base's by default: 128 tokens, 12 heads of 64). The
three sessions take turns call after call, so they see the same machine; with more than one thread
their pools are told not to spin (two spinning pools in one process take each other's cores), so
each call also pays a thread wake-up. Prints the median per engine, the ratio to onnxruntime's, and
which path bf16 took on this CPU (amx, avx512_bf16, or avx512: fp32 products). Each output is
checked against onnxruntime's first (fp32 within 1e-5, bf16 within 3e-2 of the output scale).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import onnxruntime as ort

    from sparsec import runtime
    from sparsec.lowering import attention_op
    from sparsec.runtime.build import library_isa

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,128,128,12,12,64,64", help="B,Sq,Skv,Hq,Hkv,D,Dv")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 7 or min(shape) < 1 or shape[3] % shape[4]:
        parser.error(f"--shape {args.shape!r}: seven positive sizes, Hq a multiple of Hkv")
    if not runtime.kernel_available():
        raise SystemExit("sparsec's kernel is not available here")
    B, Sq, Skv, Hq, Hkv, D, Dv = shape
    rng = np.random.default_rng(0)
    feeds = {"q": rng.standard_normal((B, Sq, Hq * D), dtype=np.float32),
             "k": rng.standard_normal((B, Skv, Hkv * D), dtype=np.float32),
             "v": rng.standard_normal((B, Skv, Hkv * Dv), dtype=np.float32)}
    sessions = {}
    for name, compute in (("onnxruntime", ""), ("kernel fp32", "fp32"), ("kernel bf16", "bf16")):
        options = runtime.session_options(args.threads) if compute else ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        if args.threads > 1:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = attention_op.single_node_model(shape, compute, "", ()).SerializeToString()
        sessions[name] = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    want = sessions["onnxruntime"].run(None, feeds)[0]
    scale = float(np.abs(want).max()) or 1.0
    for name, limit in (("kernel fp32", 1e-5), ("kernel bf16", 3e-2)):
        error = float(np.abs(sessions[name].run(None, feeds)[0] - want).max()) / scale
        if not error <= limit:
            raise SystemExit(f"{name} differs from onnxruntime's Attention by {error:.1e} of the output scale")
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.calls):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["onnxruntime"])
    path = library_isa(runtime.kernel_path(), bf16_attention=True)
    print(f"Attention {shape} (B, Sq, Skv, Hq, Hkv, D, Dv), {args.threads} thread(s), {args.calls} calls each, "
          f"bf16 on {path}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:12s} {median * 1e3:8.3f} ms  {median / base:5.2f}x onnxruntime's time")


if __name__ == "__main__":
    main()
