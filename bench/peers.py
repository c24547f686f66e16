"""Side by side, each engine alone in its own process: dense onnxruntime, onnxruntime's dynamic INT8
quantization of the dense model, sparsec's file in fp32 and INT8 on sparsec's kernel and on stock
onnxruntime (function bodies), and DeepSparse when a Python that holds it is given.

    .venv/bin/python bench/peers.py [--model bert|linear] [--rounds 5] [--repeats 20] [--threads 2]
                                    [--block 32x32] [--density 0.1] [--balanced] [--attention auto]
                                    [--deepsparse-python /path/to/venv/bin/python] [--profile] [--out DIR]

`bert`: BERT-base (random weights from the default config: speed, not accuracy), batch 1, sequence
128, every encoder linear pruned to density 0.1 in 32x32 blocks by local magnitude (block rows keep
unequal counts, as trained masks do; `--block 16x1`, `1x16` or `1x1` for vectors or unstructured
masks, which the kernel runs on its narrow-panel and row paths). `linear`: one Linear 768 -> 3072 on [128, 768], the same
density and blocks. `conv3x3`, `conv1x1`, `conv1x1_up`, `conv3x3_s2`, `conv3x3_deep`,
`conv7x7_stem`: ResNet-50-shaped convolutions at batch 1 (64->64 3x3, 256->64 and 64->256 1x1 on
56x56, 128->128 3x3 stride 2 on 56x56, 256->256 3x3 on 14x14, the 3->64 7x7 stride-2 stem on
224x224), lowered as BlockSparseConv (sparsec.lowering.targets.conv; on stock onnxruntime its
function body runs onnxruntime's own Conv on the weight rebuilt at load). `resnet50`: Hugging Face's
ResNet-50 (the default ResNetConfig, random weights) at batch 1, 224x224, every convolution pruned
the same way (the BatchNormalizations, residual Adds and Relus fold into the sparse nodes). A speed
benchmark only: with random weights, the blocks kept in one layer rarely read the channels the
layer before kept, so the pruned network's features die out (its logits are the classifier's bias
and every engine's error reads 0); the numerical checks of convolutions are the single layers
above and the tests.

`--profile` adds, per onnxruntime engine, where its time goes by kind of node (onnxruntime's
profiler on a second session in the first round's process, after the timed calls): sparsec's nodes
by weight shape and fused epilogue, other nodes by type and weight shape.

Every measurement is a fresh process that loads one file into one session, warms up, and times
`--repeats` calls (median); the engines take turns (`--rounds` times, the order reversed every
other round), so no other session's spinning threads share the cores and slow drifts of the
machine hit every engine alike. The table gives the median over rounds and the spread over
processes (min-max), which shows when one engine's time is bimodal between processes; a second
table sets each process's median beside its fastest tenth of calls (p10), which tells a process
slow for all its calls (both high: a mode of the process, or a slow period of the machine longer
than its calls) from noise within processes (only the median high); a third sets each process's
median beside the round trip of a cache line between the two CPUs measured just before it
(`bench/core_latency.cc`), which on a VM tells whether the host had placed the vCPUs near or far apart
(docs/BENCHMARKS.md, "Rows per core"). Each
engine's output on the timed input is compared with the PyTorch program (fp32 within 1e-4 of the
output scale; INT8's error is reported).

DeepSparse 1.8 (end of life) installs from the registry as `deepsparse==1.8.0` on Python 3.11: a
benchmark-only peer, never a dependency of sparsec. It runs the pruned model as a dense file with the
zeros baked in, exported for it by torch.onnx at opset 18 and ONNX IR 9 (what its onnxruntime reads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import core_round_trip_ns, machine  # noqa: E402

WORKER = Path(__file__).resolve().parent / "_peer_worker.py"
# ResNet-50-shaped convolutions (batch 1): in, out, kernel, image side, stride
CONVS = {"conv3x3": (64, 64, 3, 56, 1), "conv1x1": (256, 64, 1, 56, 1), "conv1x1_up": (64, 256, 1, 56, 1),
         "conv3x3_s2": (128, 128, 3, 56, 2), "conv3x3_deep": (256, 256, 3, 14, 1), "conv7x7_stem": (3, 64, 7, 224, 2)}
BLOCK = (32, 32)
DENSITY = 0.1


def build(kind: str):
    """(model, args, kwargs) of the benchmark model, unpruned."""
    torch.manual_seed(0)
    if kind in CONVS:
        c_in, c_out, k, size, stride = CONVS[kind]
        model = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2)).eval()
        return model, (torch.randn(1, c_in, size, size, generator=torch.Generator().manual_seed(1)),), {}
    if kind == "linear":
        model = torch.nn.Sequential(torch.nn.Linear(768, 3072)).eval()
        return model, (torch.randn(128, 768, generator=torch.Generator().manual_seed(1)),), {}
    if kind == "resnet50":
        from transformers import ResNetConfig, ResNetForImageClassification

        model = ResNetForImageClassification(ResNetConfig()).eval()   # the default config is ResNet-50
        return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)),), {}
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig()).eval()
    ids = torch.randint(0, 30000, (1, 128), generator=torch.Generator().manual_seed(1))
    return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def export_files(kind: str, out: Path, block: tuple[int, int] = BLOCK, density: float = DENSITY,
                 balanced: bool = False, deepsparse: bool = False, attention: str = "auto") -> dict[str, Path]:
    """Prune with sparsec, export the fp32 and INT8 sparse files (their Attention nodes as [export]
    `attention` says) and the dense file, quantize the dense one with onnxruntime; the PyTorch
    reference output goes to reference.npy."""
    import sparsec
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from sparsec.export.options import ExportError

    model, args, kwargs = build(kind)
    targets = (["0.weight"] if kind == "linear" or kind in CONVS else ["*convolution.weight"] if kind == "resnet50"
               else ["encoder.layer.*.weight"])
    spec = {"prune": [{"targets": targets, "method": "magnitude", "density": density, "scope": "local",
                       "block": list(block), "balanced": balanced}]}
    prog = sparsec.compile(model, spec, args, kwargs)
    prog.eval()
    files = {"sparse_fp32": out / "sparse.onnx", "sparse_int8": out / "sparse.int8.onnx",
             "dense": out / "dense.onnx", "dense_int8": out / "dense.ortint8.onnx"}
    prog.export_onnx(files["sparse_fp32"], policy="always", measure=False, attention=attention)
    try:
        prog.export_onnx(files["sparse_int8"], policy="always", int8=True, measure=False, attention=attention)
    except ExportError as exc:   # e.g. INT8 beyond its tolerance: no INT8 engines, said so
        print(f"INT8 file not written, its engines are skipped: {exc}", flush=True)
        del files["sparse_int8"]
    prog.export_onnx(files["dense"], lower=False)
    # MatMul/Gemm only: onnxruntime's QAttention does not take the opset-23 Attention node
    quantize_dynamic(str(files["dense"]), str(files["dense_int8"]), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"])
    if deepsparse:   # its onnxruntime reads ONNX IR <= 9, opsets without Attention
        files["dense_deepsparse"] = out / "dense.deepsparse.onnx"
        export_for_deepsparse(prog.finalize(), args, kwargs, files["dense_deepsparse"])
    with torch.no_grad():
        result = prog.finalize()(*args, **kwargs)
    reference = result if isinstance(result, torch.Tensor) else result[0]
    np.save(out / "reference.npy", reference.numpy())
    import onnx

    names = [i.name for i in onnx.load(str(files["dense"]), load_external_data=False).graph.input]
    feeds = {name: t.numpy() for name, t in zip(names, args)} if args else \
        {k: v.numpy() for k, v in kwargs.items() if k in names}
    np.savez(out / "feeds.npz", **feeds)
    return files


def export_for_deepsparse(model: torch.nn.Module, args: tuple, kwargs: dict, path: Path) -> None:
    """The pruned model (zeros baked in) as a dense ONNX file DeepSparse 1.8 loads: torch.onnx at
    opset 18 (attention decomposed into MatMul and Softmax), IR version 9."""
    import onnx

    torch.onnx.export(model, args, str(path), kwargs=kwargs, opset_version=18, dynamo=True, external_data=False)
    proto = onnx.load(str(path))
    proto.ir_version = 9
    onnx.save(proto, str(path))


ENGINES = {  # name: (file key, runtime)
    "dense onnxruntime fp32": ("dense", "stock"),
    "onnxruntime dynamic INT8 (dense)": ("dense_int8", "stock"),
    "sparsec fp32, kernel": ("sparse_fp32", "kernel"),
    "sparsec fp32, stock onnxruntime": ("sparse_fp32", "stock"),
    "sparsec INT8, kernel": ("sparse_int8", "kernel"),
    "sparsec INT8, stock onnxruntime": ("sparse_int8", "stock"),
}
DEEPSPARSE = "DeepSparse 1.8 (dense file with zeros)"


def fast_decile(times_ms: list[float]) -> float:
    """The 10th percentile of one process's timed calls: its speed when nothing else interferes."""
    ordered = sorted(times_ms)
    return ordered[(len(ordered) - 1) // 10]


def measure(engine: str, file: Path, runtime: str, out: Path, args: argparse.Namespace, tag: str) -> dict:
    python = args.deepsparse_python if runtime == "deepsparse" else sys.executable
    result = out / f"{tag}.json"
    command = [python, str(WORKER), "--runtime", runtime, "--file", str(file), "--feeds",
               str(out / "feeds.npz"), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--result", str(result)] + (["--profile"] if args.profile and tag.startswith("r0-") else [])
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bert", "linear", "resnet50", *CONVS), default="bert")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deepsparse-python", default=None)
    parser.add_argument("--engines", default="", help="comma-separated words: only the engines whose "
                        "names contain one (dense onnxruntime fp32 is always run: it is the reference)")
    parser.add_argument("--block", default="x".join(map(str, BLOCK)),
                        help="block shape of the masks, e.g. 32x32, 16x1, 1x16, 1x1 (unstructured)")
    parser.add_argument("--density", type=float, default=DENSITY)
    parser.add_argument("--balanced", action="store_true",
                        help="every block row keeps the same number of blocks (`balanced = true`)")
    parser.add_argument("--attention", default="auto", choices=("auto", "onnx", "kernel", "bf16"),
                        help="the sparse files' Attention nodes ([export] attention; auto: sparsec's kernel, "
                             "bf16 in the INT8 file)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where each onnxruntime engine's time goes, by kind of node (first round)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    block = tuple(int(v) for v in args.block.lower().split("x"))
    if len(block) != 2 or min(block) < 1:
        parser.error(f"--block {args.block!r}: expected two positive sizes like 32x32")
    out = Path(args.out or tempfile.mkdtemp(prefix=f"sparsec-peers-{args.model}-"))
    out.mkdir(parents=True, exist_ok=True)
    files = export_files(args.model, out, block, args.density, args.balanced, bool(args.deepsparse_python),
                         args.attention)
    words = [w.strip() for w in args.engines.split(",") if w.strip()]
    engines = {name: (files[key], runtime) for name, (key, runtime) in ENGINES.items() if key in files
               and (not words or name == "dense onnxruntime fp32" or any(w in name for w in words))}
    if args.deepsparse_python:
        engines[DEEPSPARSE] = (files["dense_deepsparse"], "deepsparse")
    reference = np.load(out / "reference.npy")
    scale = float(np.abs(reference).max()) or 1.0
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            file, runtime = engines[name]
            trip = core_round_trip_ns()
            runs[name].append(measure(name, file, runtime, out, args, f"r{r}-{list(engines).index(name)}"))
            runs[name][-1]["round_trip_ns"] = trip
            print(f"round {r + 1}/{args.rounds} {name}: "
                  f"{runs[name][-1].get('median_ms', runs[name][-1].get('error'))}"
                  + (f" (cache-line round trip between the CPUs before it: {trip:.0f} ns)" if trip else ""),
                  flush=True)
    rows, summary, spread = [], {}, []
    dense_ms = statistics.median(x["median_ms"] for x in runs["dense onnxruntime fp32"] if "median_ms" in x)
    for name, results in runs.items():
        ok = [x for x in results if "median_ms" in x]
        if not ok:
            rows.append((name, "-", "-", "-", "-", results[0].get("error", "")))
            summary[name] = {"error": results[0].get("error")}
            continue
        times = [x["median_ms"] for x in ok]
        output = np.load(ok[0]["output"])
        error = float(np.abs(output.reshape(reference.shape) - reference).max()) / scale \
            if output.size == reference.size else float("nan")
        median = statistics.median(times)
        rows.append((name, f"{median:.2f}", f"{min(times):.2f}-{max(times):.2f}", f"{dense_ms / median:.2f}x",
                     f"{error:.1e}", ok[0].get("note", "")))
        fastest = [fast_decile(x["times_ms"]) for x in ok]
        trips = [x.get("round_trip_ns") for x in ok]
        summary[name] = {"median_ms": median, "per_process_ms": times, "per_process_p10_ms": fastest,
                         "per_process_round_trip_ns": trips, "speedup": dense_ms / median, "error_rel": error}
        spread.append((name, times, fastest, trips))
    print(f"\nmachine: {machine()}")
    print(f"model: {args.model}, density {args.density} in {block[0]}x{block[1]} blocks (local magnitude"
          f"{', balanced rows' if args.balanced else ''}; attention {args.attention}), "
          f"{args.threads} threads, {args.rounds} processes per engine x {args.repeats} timed calls\n")
    print("| engine | median ms | per-process min-max | vs dense fp32 | max error / output scale | note |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print("\nThe spread between processes: each process's median, and its fastest tenth of calls (p10).\n"
          "A process slow for all its timed calls shows in both (a mode of the process, or a slow period\n"
          "of the machine longer than its calls: time one session in slices to tell them apart); noise\n"
          "within a process moves the medians only.\n")
    print("| engine | medians min-max | max / min | p10 min-max | max / min |")
    print("|---|---|---|---|---|")
    for name, times, fastest, _ in spread:
        print(f"| {name} | {min(times):.2f}-{max(times):.2f} | {max(times) / min(times):.2f} | "
              f"{min(fastest):.2f}-{max(fastest):.2f} | {max(fastest) / min(fastest):.2f} |")
    if any(all(trips) for *_, trips in spread):
        print("\nEach process's median (ms), slowest first, @ the round trip of a cache line between the two\n"
              "CPUs measured just before it (ns; bench/core_latency.cc). On a VM the host may place the vCPUs\n"
              "near or far apart from one moment to the next; multi-threaded engines slow down with it.\n")
        print("| engine | medians @ round trips |")
        print("|---|---|")
        for name, times, _, trips in spread:
            if all(trips):
                pairs = sorted(zip(times, trips), reverse=True)
                print(f"| {name} | " + " ".join(f"{t:.3g}@{n:.0f}" for t, n in pairs) + " |")
    profiles = {name: results[0]["profile"] for name, results in runs.items() if results and "profile" in results[0]}
    for name, table in profiles.items():
        total = sum(row["ms"] for row in table.values()) or 1.0
        print(f"\n{name}: time per inference by kind of node (onnxruntime profiler, first process)\n")
        print("| node | nodes | ms | share |")
        print("|---|---|---|---|")
        for label, row in sorted(table.items(), key=lambda kv: -kv[1]["ms"]):
            if row["ms"] >= 0.005 * total:
                print(f"| {label} | {row['nodes']} | {row['ms']:.2f} | {100 * row['ms'] / total:.0f}% |")
        summary[name]["profile_ms"] = table
    (out / "peers.json").write_text(json.dumps({"machine": machine(), "model": args.model,
                                                "block": list(block), "density": args.density,
                                                "balanced": args.balanced, "attention": args.attention,
                                                "threads": args.threads, "engines": summary}, indent=1))
    print(f"\nwrote {out / 'peers.json'}")


if __name__ == "__main__":
    main()
