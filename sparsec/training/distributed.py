"""Data-parallel fine-pruning under torchrun: torch.distributed's DistributedDataParallel, and only
what sparsec's own state needs on top.

    torchrun --nproc_per_node 2 -m sparsec compile model.py --spec spec.toml -o OUT

Every process captures the same graph, builds the same Program and reads its own shard of
`train_data()`. DDP all-reduces the gradients of weights and scores (for movement pruning, G =
dL/dW_eff alone, from which both are made after: `deferrable_sites`), so every process takes the
same optimizer step; masks are then recomputed on every process from identical inputs (scores, weights,
all-reduced gradients and Fisher estimates, and seeded generators for random choices), so they are
identical without being broadcast (DDP runs with `broadcast_buffers=False`). `check_masks` (the
spec's `train.check_ranks`, or `SPARSEC_CHECK_RANKS=1`) compares a hash of every mask across
processes after every mask update and stops on the first difference. Only rank 0 writes OUT; the
evaluation metric is summed over processes.

Under an initialised process group the Python API works the same way: wrap the Program in
`DistributedDataParallel(prog, broadcast_buffers=False)`, call `prog.step()` on the Program itself,
and `prog.estimate_fisher` all-reduces its estimates by itself. With FSDP2, shard a module that
holds the Program and run the Program's own calls on whole tensors:

    root = fully_shard(Root(prog), reshard_after_forward=False)   # Root.forward calls prog
    ...; loss.backward(); optimizer.step()
    with sparsec.training.fullview.whole(prog, optimizer):
        prog.step()

(`sparsec.training.backend.ShardedBackend` is exactly that.)
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sparsec import ops
from sparsec.errors import TrainingError

CHECK_ENV = "SPARSEC_CHECK_RANKS"
REDUCE_SCORES_ENV = "SPARSEC_DDP_REDUCE_SCORES"


def active() -> bool:
    """True in a process of an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True in the process that writes outputs: rank 0, or the only process."""
    return not active() or dist.get_rank() == 0


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str = "auto") -> bool:
    """Initialise the default process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL when the processes train on CUDA, else gloo. Returns whether it
    initialised one (False when not launched, or when one already exists)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise TrainingError("this torch build has no torch.distributed; run without torchrun")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend)
    except (ValueError, RuntimeError) as exc:   # a launcher environment without MASTER_ADDR, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainingError(f"cannot start the {backend} process group from the launcher's environment "
                            f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')}): {first}; launch with torchrun") from exc
    return True


def shutdown(clean: bool = True) -> None:
    """Destroy the default process group. After a clean run every process first waits for the
    others (a barrier): a gloo group torn down while a peer still finishes its last collective
    aborts the process ("terminate called without an active exception"). After an error there is
    no barrier (the other processes may never reach it)."""
    if dist.is_available() and dist.is_initialized():
        if clean and active():
            dist.barrier()
        dist.destroy_process_group()


def check_requested(train: Any) -> bool:
    """Whether masks are to be compared across processes after every update: the spec's `[train]
    check_ranks` (`train` may be None) or SPARSEC_CHECK_RANKS set to anything but 0."""
    return bool(train is not None and train.check_ranks) or \
        os.environ.get(CHECK_ENV, "").strip() not in ("", "0")


def mask_digests(prog: Any) -> list[tuple[str, str]]:
    """(site, sha256 of its mask's bytes) for every site, in graph order."""
    return [(name, hashlib.sha256(mask.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
            for name, mask in prog.masks().items()]


def check_masks(prog: Any) -> None:
    """Stop with a TrainingError naming the step, the first site and the processes when the masks
    differ across processes (a collective: every process must call it)."""
    if not active():
        return
    mine = mask_digests(prog)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    for other_rank, theirs in enumerate(gathered):
        if theirs == mine:
            continue
        site = next((a[0] for a, b in zip(mine, theirs) if a != b), "(the list of sites)")
        raise TrainingError(f"masks differ across processes after step {int(prog.step_count)}: site "
                            f"{site!r} on rank {dist.get_rank()} and rank {other_rank} (a method's "
                            f"selection is not deterministic under data parallelism)")


def deferrable_sites(prog: Any) -> list[str]:
    """The sites whose score gradient DDP need not all-reduce: movement pruning's straight-through
    gradients (dL/dW = G * M, dL/dS = G * W, Eq 2) are both linear in G = dL/dW_eff, so all-reducing
    G alone (in the weight's gradient) and applying both formulas after gives the same average
    with one tensor of the weight's size on the wire instead of two (up to float rounding: the
    scores' gradient is G's average times W rather than the average of G * W). Sites whose weight
    or scores are frozen keep the plain gradients. None when SPARSEC_DDP_REDUCE_SCORES is set
    (DDP then all-reduces both gradients, as FSDP does, e.g. to compare the two bit for bit)."""
    if os.environ.get(REDUCE_SCORES_ENV, "").strip() not in ("", "0") or \
            not hasattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model"):
        return []
    names = []
    for st in prog.site_states():
        method = prog.method(st.site.group)
        if method.mask_module(st.site) is None and method.mask_op() is ops.straight_through_mask \
                and st.scores is not None and st.weight.requires_grad and st.scores.requires_grad:
            names.append(st.site.name)
    return names
