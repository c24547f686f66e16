"""One engine, one file, one process: bench/peers.py starts this for every measurement.

It imports only numpy and the engine (onnxruntime, sparsec's runtime, or deepsparse), so that it
runs under another Python too (a venv holding DeepSparse). It writes the median time and the path
of the output it computed on the feeds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

WARMUP = 5


def runner(runtime: str, file: str, threads: int, feeds: dict):
    if runtime == "deepsparse":
        import onnx
        from deepsparse import compile_model

        graph = onnx.load(file, load_external_data=False).graph
        stored = {t.name for t in graph.initializer}
        order = [feeds[i.name] for i in graph.input if i.name not in stored]   # its inputs, in order
        engine = compile_model(file, batch_size=int(order[0].shape[0]), num_cores=threads)
        return (lambda: engine(order)), "deepsparse " + getattr(__import__("deepsparse"), "__version__", "")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if runtime == "kernel":
        from sparsec import runtime as sparsec_runtime

        if not sparsec_runtime.kernel_available():
            raise SystemExit("sparsec's kernel is not available here")
        session = sparsec_runtime.session(file, threads=threads, options=options)
        note = "sparsec.runtime session"
    else:
        session = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
        note = f"onnxruntime {ort.__version__}"
    names = [i.name for i in session.get_inputs()]
    feed = {name: feeds[name] for name in names}
    return (lambda: session.run(None, feed)), note


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=("stock", "kernel", "deepsparse"), required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    feeds = dict(np.load(args.feeds))
    run, note = runner(args.runtime, args.file, args.threads, feeds)
    for _ in range(WARMUP):
        outputs = run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = run()
        times.append(time.perf_counter() - start)
    output_path = args.result.replace(".json", ".out.npy")
    np.save(output_path, np.asarray(outputs[0], dtype=np.float32))
    with open(args.result, "w") as f:
        json.dump({"median_ms": statistics.median(times) * 1000, "times_ms": [t * 1000 for t in times],
                   "output": output_path, "note": note}, f)


if __name__ == "__main__":
    main()
