"""Lowering that knows its runtime: stock onnxruntime vs dense, before and after `[export] target`.

1. BERT-base-shaped layers (rows 128; [768, 768], [3072, 768], [768, 3072]; 32x32 blocks, density
   0.1): the layer alone, dense MatMul vs the sparse node on stock onnxruntime (function body) and
   with sparsec's kernel, for an unbalanced mask (local Top-v of a weight whose rows differ in
   scale, as trained masks are) and a balanced one (`balanced = true`: per-row Top-v of the same
   scores). Each candidate alone in its own session, alternating, medians (sparsec.lowering.calibrate).
2. Models (random weights, magnitude pruning, local scope, density 0.1): a small BERT (`--model
   small`, hidden 128, 2 layers, seq 32, 16x16 blocks) and BERT-base (`--model base`, seq 128,
   32x32 blocks). For each, the file run on stock onnxruntime against the dense file (each alone,
   medians, sparsec.export.stock_check.time_files):
      before  what sparsec chose before `target`: the kernel's constant cost model
              (`target = "sparsec"`, `measure = false`), run on stock onnxruntime
      after   `target = "stock"`: layers measured on stock onnxruntime, the whole file checked
      after, balanced   the same with `balanced = true`

    .venv/bin/python bench/target_runtime.py [--threads 2] [--model small|base|none] [--layers]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

LAYERS = [(768, 768), (3072, 768), (768, 3072)]


def masks(n: int, k: int, block: tuple[int, int], density: float, seed: int):
    """(unbalanced, balanced) block grids from the same block scores: block magnitudes of a weight
    whose output rows differ in scale (row scale ~ U(0.7, 1))."""
    from sparsec import blocks
    from sparsec.topv import top_v, top_v_rows

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * (0.7 + 0.3 * torch.rand(n, 1, generator=gen))
    scores = blocks.block_reduce(weight.abs(), block, "sum")
    return weight, top_v([scores], None, density)[0], top_v_rows(scores, density)


def layer_rows(threads: int) -> list[tuple]:
    from sparsec.lowering import calibrate, cost

    rows = []
    kernel = not calibrate.kernel_unavailable()
    for i, (n, k) in enumerate(LAYERS):
        weight, unbalanced, balanced = masks(n, k, (32, 32), 0.1, seed=i)
        for label, grid in (("unbalanced", unbalanced), ("balanced", balanced)):
            w = weight * grid.repeat_interleave(32, 0).repeat_interleave(32, 1)
            stats = cost.block_stats(w, (32, 32))
            out = [f"{n}x{k}", label, f"{stats.block_density:.3f}", f"{stats.stored:.3f}"]
            for target in ("stock", "sparsec"):
                if target == "sparsec" and not kernel:
                    out.append("-")
                    continue
                case = calibrate.LayerCase(target, (n, k), (32, 32), 128, stats.kept_blocks,
                                           stats.max_per_row, threads)
                dense, sparse, _ = calibrate.time_layer(case, w.numpy(), np.zeros(n, np.float32))
                out.append(f"{dense:.3f} / {sparse:.3f} = {dense / sparse:.2f}x")
            rows.append(tuple(out))
            print(" | ".join(out), flush=True)
    return rows


def bert(size: str):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    if size == "small":
        config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=512, vocab_size=1000)
        seq, block = 32, [16, 16]
    else:
        config, seq, block = BertConfig(), 128, [32, 32]
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, block


def model_rows(size: str, threads: int) -> list[tuple]:
    import sparsec
    from sparsec.export import ExportOptions, export_pair
    from sparsec.export.stock_check import time_files

    rows = []
    model, kwargs, block = bert(size)
    for balanced in (False, True):
        spec = {"prune": [{"targets": ["encoder.layer.*.weight"], "method": "magnitude", "density": 0.1,
                           "scope": "local", "block": block, "balanced": balanced}],
                "schedule": {"kind": "constant"}}
        prog = sparsec.compile(model, spec, (), kwargs).eval()
        runs = [("after, balanced" if balanced else "after", ExportOptions(target="stock", threads=threads))]
        if not balanced:
            runs.insert(0, ("before", ExportOptions(target="sparsec", measure=False, threads=threads)))
        for label, options in runs:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                pair = export_pair(prog.module, Path(tmp) / "model.onnx", Path(tmp) / "dense.onnx",
                                   prog.example_inputs, prog.example_kwargs, options)
                seconds = time.perf_counter() - start
                attempt = time_files(Path(tmp) / "model.onnx", Path(tmp) / "dense.onnx", threads)
            outcome = (pair.model.stock_check or {}).get("outcome") or (
                "not checked (target sparsec)" if options.target == "sparsec"
                else "no layer measured faster on stock onnxruntime: nothing lowered")
            row = (size, label, str(attempt.sparse_layers), f"{attempt.dense_ms:.3f}",
                   f"{attempt.sparse_ms:.3f}", f"{attempt.speedup:.2f}x", f"{seconds:.0f} s", outcome)
            rows.append(row)
            print(" | ".join(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=("small", "base", "none"), default="small")
    parser.add_argument("--layers", action="store_true", help="also the BERT-base-shaped layers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("SPARSEC_MEASURE", None)
    import onnxruntime

    print(f"machine: {machine()}, onnxruntime {onnxruntime.__version__}, {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.layers:
        print("\nlayer | mask | block density | stored | stock: dense / sparse ms | kernel: dense / sparse ms")
        layer_rows(args.threads)
    if args.model != "none":
        print("\nmodel | lowering | sparse layers | dense ms | sparse ms (stock) | speedup | export | outcome")
        model_rows(args.model, args.threads)


if __name__ == "__main__":
    main()
