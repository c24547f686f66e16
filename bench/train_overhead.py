"""Training-step overhead of movement pruning vs the dense model.

    .venv/bin/python bench/train_overhead.py [--repeats 10] [--every 1] [--ddp]

MiniLM-size BERT (6 layers, hidden 384, 12 heads, intermediate 1536; the all-MiniLM-L6-v2
shape) with a classification head, batch 16, sequence 128. Dense: the eager model. Sparse: the
sparsec Program with movement pruning (global, density 0.1, every encoder linear, block 1x1 or
`--block`),
masks recomputed every `--every` steps. One step = forward, loss, backward, AdamW step (same
optimizer settings for both), `prog.step()`, zero_grad. Runs are interleaved, medians reported.
Target (DESIGN.md): sparse / dense <= 1.10.

`--ddp`: the same under data parallelism, 2 CPU processes (gloo, one thread each, batch 8 per
process): dense DDP against movement pruning wrapped as `sparsec compile` wraps it under torchrun
(sparsec.training.backend.DistributedBackend: DDP all-reduces movement's G = dL/dW_eff alone and
the score gradients are made from it after; `--reduce-scores` all-reduces both gradients instead).
Both step their own model, interleaved, and rank 0 reports the medians and the median ratio of
adjacent steps.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median  # noqa: E402

import sparsec  # noqa: E402


def adamw(groups) -> torch.optim.Optimizer:
    try:
        return torch.optim.AdamW(groups, lr=3e-5, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=3e-5)


def steps(args: argparse.Namespace, batch: int, wrap=None, backend=None):
    """(dense step, movement step, Program) on a MiniLM-size BERT; `wrap(module, prog)` returns
    the module to call (DDP), identity by default. With a training `backend`, the movement step
    runs its forward pass in `backend.autocast()` and its optimizer step through `backend.step()`,
    as the fine-pruning loop does."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, num_labels=2)
    dense = BertForSequenceClassification(config).train()
    ids = torch.randint(0, config.vocab_size, (batch, 128))
    labels = torch.randint(0, 2, (batch,))
    spec = {"prune": [{"targets": ["bert.encoder.layer.*"], "method": "movement", "density": 0.1,
                       "scope": "global", "block": [args.block, args.block]}],
            "schedule": {"kind": "constant", "every": args.every}}
    prog = sparsec.compile(copy.deepcopy(dense), spec, (ids,))
    prog.train()
    opt_dense = adamw(dense.parameters())
    opt_sparse = adamw([{"params": prog.model_parameters()},
                        {"params": prog.score_parameters(), "lr": 1e-2, "weight_decay": 0.0}])
    dense_call = wrap(dense, None) if wrap else dense
    sparse_call = wrap(prog, lambda: torch.nn.functional.cross_entropy(prog(ids).logits, labels)) if wrap else prog

    def dense_step() -> None:
        loss = torch.nn.functional.cross_entropy(dense_call(ids).logits, labels)
        loss.backward()
        opt_dense.step()
        opt_dense.zero_grad()

    params = [p for group in opt_sparse.param_groups for p in group["params"]]

    def sparse_step() -> None:
        with backend.autocast() if backend is not None else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(sparse_call(ids).logits, labels) + prog.regularization()
        loss.backward()
        if backend is not None:
            backend.step(opt_sparse, params, 0.0)
        else:
            opt_sparse.step()
        prog.step()
        opt_sparse.zero_grad()

    for _ in range(args.settle):  # scores move away from their constant start
        sparse_step()
    return dense_step, sparse_step, prog


def report(args: argparse.Namespace, times: dict, prog, what: str) -> None:
    t_dense, t_sparse = median(times["dense"]), median(times["movement"])
    print(f"machine: {machine()}")
    print(f"MiniLM-size BERT, {what}, seq 128, {args.repeats} interleaved steps, medians; "
          f"{args.block}x{args.block} blocks, masks every {args.every} step(s); density {prog.density():.4f}")
    print(f"dense step            {t_dense * 1000:8.1f} ms")
    print(f"movement step         {t_sparse * 1000:8.1f} ms")
    print(f"ratio                 {t_sparse / t_dense:8.3f}   (target <= 1.10)")
    paired = median([s / d for s, d in zip(times["movement"], times["dense"])])
    print(f"median paired ratio   {paired:8.3f}   (each movement step over the dense step next to it)")


def ddp_worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sparsec.spec import TrainSpec
    from sparsec.training.backend import DistributedBackend

    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    backend = DistributedBackend(TrainSpec(steps=1, device="cpu"))

    def wrap(module, probe):
        return DistributedDataParallel(module) if probe is None else backend.place(module, probe)

    dense_step, sparse_step, prog = steps(args, 16 // world, wrap, backend)

    def synced(step):
        def run() -> None:
            dist.barrier()
            step()
            dist.barrier()
        return run

    times = interleaved({"dense": synced(dense_step), "movement": synced(sparse_step)}, repeats=args.repeats)
    if rank == 0:
        report(args, times, prog, f"DDP over {world} CPU processes (1 thread each), batch {16 // world} per process")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--settle", type=int, default=10, help="sparse steps before timing")
    parser.add_argument("--ddp", action="store_true", help="2 CPU processes with DistributedDataParallel")
    parser.add_argument("--block", type=int, default=1, help="square block side of the scores (1: unstructured)")
    parser.add_argument("--reduce-scores", action="store_true",
                        help="with --ddp: DDP all-reduces the scores' gradients too (SPARSEC_DDP_REDUCE_SCORES=1) "
                             "instead of G = dL/dW_eff alone")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.ddp:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if args.reduce_scores:
            from sparsec.training.distributed import REDUCE_SCORES_ENV

            os.environ[REDUCE_SCORES_ENV] = "1"
        mp.spawn(ddp_worker, args=(2, port, args), nprocs=2, join=True)
        return
    dense_step, sparse_step, prog = steps(args, 16)
    times = interleaved({"dense": dense_step, "movement": sparse_step}, repeats=args.repeats)
    report(args, times, prog, "batch 16")


if __name__ == "__main__":
    main()
