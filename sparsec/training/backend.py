"""The trainer seam: what a training backend owns, apart from the loop that is the same everywhere.

The fine-pruning loop (sparsec.training.loop) follows the Program's contract on every backend:
forward, loss (+ distillation, regularization), backward, optimizer.step(), prog.step(),
zero_grad(). A backend owns what differs between machines and process layouts:

    place(prog, probe)       move the Program (weights, masks, scores, teacher) where it trains and
                             return the module the loop calls (a DDP wrapper, for data parallelism;
                             `probe()` is the loss of the first batch, to find unused parameters)
    batch(batch)             move one batch there
    autocast()               the precision context of the forward pass
    backward(loss)           loss.backward() (scaled, for fp16)
    no_sync(module)          the context of a micro-batch that accumulates without all-reducing
    step(optimizer, params, max_grad_norm)   unscale, clip and take the optimizer step
    is_main, rank, world     whether this process writes outputs and shows progress; its place
    reduce_sum(values)       sums of evaluation statistics over processes
    all_reduce(tensors)      sums of tensors over processes, in place
    gather(value)            every process's value (the random generators, for checkpoints)
    after_mask_update(prog)  after a prog.step() that recomputed masks (the cross-process check)
    state_dict()             the gradient scaler's state, for checkpoints
    whole(prog, optimizer)   the context in which the Program's own code (prog.step(), estimates,
                             checkpoints) sees whole parameters, gradients and optimizer state
    evaluator(placed, prog)  the module evaluation calls
    release(prog)            after training: the Program back to plain parameters

`LocalBackend` is one process, on the CPU or one GPU, in float32 or with autocast to bfloat16 /
float16 (with a gradient scaler). `DistributedBackend` is one of several processes under torchrun,
with DistributedDataParallel (sparsec.training.distributed: the process group, the mask check).
`ShardedBackend` is the same with FSDP2 (`fully_shard`, `[train] parallel = "fsdp"`): parameters,
gradients and optimizer state sharded across the processes between steps
(sparsec.training.fullview gathers them whole where the Program needs them).
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree

from sparsec import ops
from sparsec.errors import TrainingError
from sparsec.training import distributed, fullview

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DDP_OPTIONS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`[train] device` as a torch.device: `auto` is CUDA when available (the GPU of the local rank
    under torchrun), else the CPU. Asking for CUDA where there is none is a user error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError(f"train.device = {name!r}, but CUDA is not available here (torch "
                            f"{torch.__version__}); use device = \"cpu\" or \"auto\"")
    device = torch.device(name)
    if device.index is None:
        device = torch.device("cuda", local_rank or 0)
    if device.index >= torch.cuda.device_count():
        raise TrainingError(f"train.device = {name!r}, but this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s)")
    return device


class Backend:
    name = "backend"

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32"):
        self.device = torch.device(device)
        self.precision = precision
        if precision not in ("fp32", *DTYPES):
            raise ValueError(f"unknown precision {precision!r}")
        if precision == "fp16" and self.device.type == "cpu" and not _cpu_fp16_autocast():
            raise TrainingError("train.precision = \"fp16\" needs a GPU here (this torch has no "
                                "float16 autocast on the CPU); use \"bf16\"")
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def place(self, prog: torch.nn.Module, probe: Callable[[], torch.Tensor] | None = None) -> torch.nn.Module:
        """`probe()`, when given, is the loss of the first batch: a backend that must know which
        parameters get gradients may run it (and restores the random generators after)."""
        return prog.to(self.device)

    def batch(self, batch: Any) -> Any:
        return pytree.tree_map(lambda t: t.to(self.device) if isinstance(t, torch.Tensor) else t, batch)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def no_sync(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_grad_norm: float) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    @property
    def is_main(self) -> bool:
        return True

    rank, world = 0, 1

    def reduce_sum(self, values: list[float]) -> list[float]:
        return values

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        return None

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order (a collective under torchrun)."""
        return [value]

    def after_mask_update(self, prog: Any) -> None:
        """Called after every `prog.step()` that recomputed masks."""

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def whole(self, prog: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
              grads: bool = True, needed: bool = True) -> contextlib.AbstractContextManager:
        """The context in which code written for whole tensors (prog.step(), the loss-modelling
        estimates, checkpoints) runs; nothing to do where every process holds whole parameters."""
        return contextlib.nullcontext()

    def evaluator(self, placed: torch.nn.Module, prog: torch.nn.Module) -> torch.nn.Module:
        """The module that evaluation calls: the Program itself, where its parameters are whole."""
        return prog

    def release(self, prog: torch.nn.Module) -> None:
        """After training: leave `prog` with plain parameters (it is written and lowered next)."""


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.ones(2, 2) @ torch.ones(2, 2) is not None
    except RuntimeError:
        return False


class LocalBackend(Backend):
    """One process, on the CPU or one GPU."""

    name = "local"


class DistributedBackend(Backend):
    """One process of several: DDP around the Program, gradients all-reduced by DDP, evaluation
    statistics and Fisher estimates all-reduced here, masks checked across processes on request.
    For movement pruning's sites DDP all-reduces G = dL/dW_eff alone (in the weight's gradient; the
    forward runs in `ops.deferred_score_gradients()`), and `step()` makes both gradients from it
    first (sparsec.training.distributed.deferrable_sites)."""

    name = "ddp"

    def __init__(self, train: Any):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        super().__init__(resolve_device(train.device, local_rank), train.precision)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.check = distributed.check_requested(train)
        self._deferred: list[str] = []   # sites whose score gradient is made from the all-reduced G
        self._prog: Any = None

    @property
    def rank(self) -> int:  # type: ignore[override]
        return dist.get_rank()

    @property
    def world(self) -> int:  # type: ignore[override]
        return dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, prog: torch.nn.Module, probe: Callable[[], torch.Tensor] | None = None) -> torch.nn.Module:
        prog.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # Masks and method state are computed identically on every process: no buffer sync in
        # forward (which would also hide a divergence).
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                          else {"broadcast_buffers": False})
        self._prog, self._deferred = prog, distributed.deferrable_sites(prog)
        # DDP all-reduces G = dL/dW_eff in the weight's gradient; the scores' gradients are made
        # from it after the all-reduce (sparsec.ops.finish_deferred), so DDP leaves them out
        scores = {id(prog.state_of(name).scores) for name in self._deferred}
        if scores:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                prog, [n for n, p in prog.named_parameters() if id(p) in scores])
        return DistributedDataParallel(prog, device_ids=ids, find_unused_parameters=self._unused(prog, probe, scores),
                                       **no_buffer_sync)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self._deferred:
            return super().autocast()
        stack = contextlib.ExitStack()
        stack.enter_context(super().autocast())
        stack.enter_context(ops.deferred_score_gradients())
        return stack

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
             max_grad_norm: float) -> None:
        self.finish_gradients()   # before unscaling and clipping: both formulas are linear in G
        super().step(optimizer, params, max_grad_norm)

    def finish_gradients(self) -> None:
        """After the backward passes of a step (and DDP's all-reduce): the weights' and scores'
        gradients of the sites whose forward left G = dL/dW_eff in W.grad."""
        for name in self._deferred:
            st = self._prog.state_of(name)
            ops.finish_deferred(st.weight, st.mask, st.scores, st.site.block)

    def _unused(self, prog: torch.nn.Module, probe: Callable[[], torch.Tensor] | None, ignored: set[int]) -> bool:
        """Whether some trainable parameter gets no gradient from the loss (a pooler the loss does
        not use): DDP must then look for unused parameters every step. Decided on the first batch
        by every process together; without a probe, assume so. `ignored`: ids of the parameters DDP
        leaves out (scores whose gradient is made after the all-reduce)."""
        if probe is None:
            return True
        generators = torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        try:
            self.backward(probe())
            unused = any(p.grad is None for p in prog.parameters() if p.requires_grad and id(p) not in ignored)
        finally:
            for p in prog.parameters():
                p.grad = None
            torch.set_rng_state(generators[0])
            if generators[1] is not None:
                torch.cuda.set_rng_state(generators[1], self.device)
        flag = torch.tensor([float(unused)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def no_sync(self, module: torch.nn.Module) -> contextlib.AbstractContextManager:
        return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()

    def reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def all_reduce(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            dist.all_reduce(t)

    def gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def after_mask_update(self, prog: Any) -> None:
        if self.check:
            distributed.check_masks(prog)


class _Root(torch.nn.Module):
    """The module FSDP2 shards: the Program as its only child, so that fully_shard's hooks and
    class change stay on this wrapper and the Program stays a Program."""

    def __init__(self, prog: torch.nn.Module):
        super().__init__()
        self.program = prog

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.program(*args, **kwargs)


class ShardedBackend(DistributedBackend):
    """One process of several with FSDP2 (`fully_shard`): each process keeps a shard of every
    parameter, its gradient and its optimizer state (the optimizer's memory divided by the number
    of processes); the forward pass gathers the parameters, the backward pass reduce-scatters the
    gradients. The Program is one flat graph, so it is one FSDP unit: all its parameters are
    gathered for the forward and backward passes (kept gathered in between, so that
    `prog.regularization()` sees them), and released after. The Program's own code runs on whole
    tensors through `whole()`."""

    name = "fsdp"

    def __init__(self, train: Any):
        self.check_precision(train.precision)
        super().__init__(train)
        self._placed: Any = None

    @staticmethod
    def check_precision(precision: str) -> None:
        if precision == "fp16":
            raise TrainingError("train.parallel = \"fsdp\" trains in fp32 or bf16 (no gradient scaler "
                                "for sharded gradients here); use precision = \"bf16\", or parallel = \"ddp\"")

    def place(self, prog: torch.nn.Module, probe: Callable[[], torch.Tensor] | None = None) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        prog.to(self.device)
        self._prog, self._deferred = prog, []   # gradients are reduce-scattered in shards: all of them
        # Sharding draws from the random generators (the device mesh's set-up): keep them as they
        # were, so that a run under fsdp draws what the same run under ddp does.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self._placed = fully_shard(_Root(prog), reshard_after_forward=False)
        return self._placed

    @contextlib.contextmanager
    def no_sync(self, module: torch.nn.Module):  # type: ignore[override]
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def whole(self, prog: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
              grads: bool = True, needed: bool = True) -> contextlib.AbstractContextManager:
        if not needed:
            return contextlib.nullcontext()
        if self._placed is not None:
            self._placed.reshard()   # after an evaluation the parameters may still be gathered
        return fullview.whole(prog, optimizer, grads)

    def evaluator(self, placed: torch.nn.Module, prog: torch.nn.Module) -> torch.nn.Module:
        return placed

    def release(self, prog: torch.nn.Module) -> None:
        if self._placed is not None:
            self._placed.reshard()
        fullview.release(prog)
        self._placed = None


def backend_for(train: Any) -> Backend:
    """The backend the spec's [train] table asks for: under torchrun (an initialised process group
    of more than one process) DistributedBackend, or ShardedBackend with `parallel = "fsdp"`; else
    LocalBackend."""
    if distributed.active():
        return ShardedBackend(train) if train.parallel == "fsdp" else DistributedBackend(train)
    return LocalBackend(resolve_device(train.device), train.precision)
