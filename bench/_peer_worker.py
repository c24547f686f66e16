"""One engine, one file, one process: bench/peers.py starts this for every measurement.

It imports only numpy and the engine (onnxruntime, sparsec's runtime, or deepsparse), so that it
runs under another Python too (a venv holding DeepSparse). It writes the median time and the path
of the output it computed on the feeds; with --profile (onnxruntime engines, which need onnx too)
also the time per inference of each kind of node, from a second, profiled session.
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


def node_label(node, shapes: dict) -> str:
    """What a node is, for the per-layer table: sparsec's ops by weight shape and fused epilogue,
    other ops by type and the shape of a weight they read (an initializer of rank 2 or 4)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("BlockSparseLinear", "BlockSparseConv"):
        label = f"{node.op_type} {attrs.get('N')}x{attrs.get('K')}"
        if "kernel_shape" in attrs:
            label += " {}x{}".format(*attrs["kernel_shape"])
        act = attrs.get("activation", b"")
        tail = [act.decode() if isinstance(act, bytes) else act] if act else []
        tail += ["residual"] if len(node.input) > 6 and node.input[6] else []
        tail += ["LayerNorm"] if len(node.input) > 7 and node.input[7] else []
        tail += ["INT8"] if attrs.get("compute", b"") in (b"int8", "int8") else []
        return label + (" + " + ", ".join(tail) if tail else "")
    weight = next((shapes[i] for i in node.input if len(shapes.get(i, ())) in (2, 4)), None)
    return node.op_type + (" " + "x".join(map(str, weight)) if weight else "")


def profile(file: str, threads: int, feeds: dict, runtime: str, repeats: int) -> dict:
    """Milliseconds per inference by node label (onnxruntime's profiler, a second session made for
    it after the timed runs)."""
    import json as json_
    import os
    import tempfile

    import onnx
    import onnxruntime as ort

    graph = onnx.load(file, load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    labels = {n.name: node_label(n, shapes) for n in graph.node}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="sparsec-profile-"), "run")
    if runtime == "kernel":
        from sparsec import runtime as sparsec_runtime

        session = sparsec_runtime.session(file, threads=threads, options=options)
    else:
        session = ort.InferenceSession(file, options, providers=["CPUExecutionProvider"])
    feed = {i.name: feeds[i.name] for i in session.get_inputs()}
    for _ in range(repeats):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = json_.load(f)
    runs = max(1, sum(1 for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"))
    table: dict[str, dict] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        row = table.setdefault(labels.get(name, e.get("args", {}).get("op_name", name)), {"ms": 0.0, "nodes": set()})
        row["ms"] += e["dur"] / 1000 / runs
        row["nodes"].add(name)
    return {label: {"ms": row["ms"], "nodes": len(row["nodes"])} for label, row in table.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runtime", choices=("stock", "kernel", "deepsparse"), required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--result", required=True)
    parser.add_argument("--profile", action="store_true", help="also time each node (onnxruntime engines)")
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
    result = {"median_ms": statistics.median(times) * 1000, "times_ms": [t * 1000 for t in times],
              "output": output_path, "note": note}
    if args.profile and args.runtime != "deepsparse":
        result["profile"] = profile(args.file, args.threads, feeds, args.runtime, args.repeats)
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
