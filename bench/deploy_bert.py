"""Whole-model deployment benchmark: BERT-base, seq 128, batch 1, every encoder linear block-sparse.

Every encoder linear (Q, K, V, attention output, FFN in and out: 72 layers) keeps random 32x32
blocks at density 0.1, spread evenly over block rows (row counts differ by at most one, so the
padded layout stores ceil(kept per row) slots). Weights are random (no download): this measures
speed and size, not accuracy. sparsec lowers and exports it (verified against PyTorch), and the
sparse file is timed against the dense export in one process, interleaved, medians:
dense onnxruntime vs the sparse file on stock onnxruntime (function bodies) and with sparsec's
kernel. File sizes: the encoder linears' weights, dense fp32 vs packed fp32 and INT8 blocks.

    .venv/bin/python bench/deploy_bert.py [--threads 2] [--repeats 20] [--rowwise] [--out DIR]

`--rowwise` keeps round(0.1 * blocks per row) in every block row instead (2 of 24 for the
768-input linears, 10 of 96 for the 3072-input one; 0.090 overall): no padding slots.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine  # noqa: E402

ENCODER_LINEAR = re.compile(r"encoder\.layer\.\d+\..*\.weight$")
BLOCK = (32, 32)


def build(rowwise: bool, seed: int = 0):
    from transformers import BertConfig, BertModel

    from sparsec.lowering.block_format import random_keep

    torch.manual_seed(seed)
    model = BertModel(BertConfig()).eval()
    kept = total = 0
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if p.dim() != 2 or not ENCODER_LINEAR.search(name):
                continue
            n, k = p.shape
            if rowwise:
                rows, cols = -(-n // BLOCK[0]), -(-k // BLOCK[1])
                keep = np.zeros((rows, cols), dtype=bool)
                rng = np.random.default_rng(seed + i)
                for r in range(rows):
                    keep[r, rng.choice(cols, size=max(1, round(0.1 * cols)), replace=False)] = True
            else:
                keep = random_keep(n, k, BLOCK, 0.1, seed=seed + i, balanced=True)
            mask = torch.from_numpy(keep).repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)
            p.mul_(mask[:n, :k].to(p.dtype))
            kept += int(mask[:n, :k].sum())
            total += p.numel()
    return model, kept / total


def main() -> None:
    import sparsec
    from sparsec.bench import bench, format_bench, sparse_layers

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rowwise", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, density = build(args.rowwise)
    ids = torch.randint(0, 30000, (1, args.seq), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    spec = {"prune": [{"targets": ["encoder.layer.*.weight"], "method": "magnitude", "density": 1.0,
                       "block": list(BLOCK)}]}
    prog = sparsec.compile(model, spec, (), kwargs)
    prog.eval()
    out = Path(args.out or tempfile.mkdtemp(prefix="sparsec-bert-"))
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    start = time.perf_counter()
    fp32 = prog.export_onnx(out / "bert.onnx", policy="always", measure=False)
    timings["export_sparse_s"] = time.perf_counter() - start
    start = time.perf_counter()
    prog.export_onnx(out / "bert.dense.onnx", lower=False)
    timings["export_dense_s"] = time.perf_counter() - start
    int8 = prog.export_onnx(out / "bert.int8.onnx", policy="always", int8=True, measure=False)

    dense_bytes = sum(p.numel() * 4 for name, p in prog.finalize().named_parameters()
                      if ENCODER_LINEAR.search(name))
    fp32_bytes = sum(layer.bytes for layer in sparse_layers(out / "bert.onnx"))
    int8_bytes = sum(layer.bytes for layer in sparse_layers(out / "bert.int8.onnx"))
    result = bench(out / "bert.onnx", out / "bert.dense.onnx", threads=args.threads,
                   repeats=args.repeats)
    print(f"machine: {machine()}")
    print(f"BERT-base seq {args.seq} batch 1, encoder linears: density {density:.4f} in 32x32 blocks "
          f"({'whole blocks per row' if args.rowwise else 'balanced rows'})")
    print(f"checks fp32: {[(c.runtime, f'{c.error:.1e}') for c in fp32.checks]}; int8 error vs "
          f"dense program {int8.error_vs_dense:.2e}, checks {[(c.runtime, f'{c.error:.1e}') for c in int8.checks]}")
    print(format_bench(result))
    print(f"encoder linear weights: dense fp32 {dense_bytes / 1e6:.1f} MB, blocks fp32 "
          f"{fp32_bytes / 1e6:.1f} MB ({dense_bytes / fp32_bytes:.1f}x smaller), int8 "
          f"{int8_bytes / 1e6:.1f} MB ({dense_bytes / int8_bytes:.1f}x smaller)")
    print(f"files: dense {(out / 'bert.dense.onnx').stat().st_size / 1e6:.1f} MB, fp32 "
          f"{(out / 'bert.onnx').stat().st_size / 1e6:.1f} MB, int8 "
          f"{(out / 'bert.int8.onnx').stat().st_size / 1e6:.1f} MB; export s: {timings}")
    summary = {"density": density, "rowwise": args.rowwise, "bench": result.to_dict(),
               "encoder_bytes": {"dense": dense_bytes, "fp32": fp32_bytes, "int8": int8_bytes},
               "int8_error_vs_dense": int8.error_vs_dense, "machine": machine(), **timings}
    (out / "deploy_bert.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/deploy_bert.json")


if __name__ == "__main__":
    main()
