"""Data-parallel fine-pruning on the CPU: `torchrun --nproc_per_node 2 -m sparsec compile` with gloo.

For movement, magnitude (global), pins, lm and dynsparse, every mask update is checked across the
two processes (SPARSEC_CHECK_RANKS=1 stops the run on the first difference), the density is reached
and OUT is written once. The check itself is shown to catch a difference. A run killed with SIGKILL
and resumed on two processes ends bit-identical to an uninterrupted one on two processes. The same
runs under FSDP2 (`parallel = "fsdp"`) end bit-identical to DDP's, killed and resumed included.
CUDA (NCCL) is tested where a GPU is present."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsec.training import checkpoint, distributed
from tests.test_resume import MODEL, assert_same_training

STEPS = 20
CUBIC = {"kind": "cubic", "total": STEPS, "warmup": 2, "cooldown": 4}
METHODS = {
    "movement": ({"method": "movement", "block": [8, 8]}, CUBIC),
    "magnitude_global": ({"method": "magnitude", "scope": "global"}, CUBIC),
    "pins": ({"method": "pins"}, CUBIC),
    "lm": ({"method": "lm", "fisher_examples": 16, "fisher_chunk": 4},
           {"kind": "linear", "total": STEPS, "warmup": 2, "cooldown": 2, "iterations": 4}),
    "dynsparse": ({"method": "dynsparse", "block": [4, 4]}, {"kind": "constant", "total": STEPS, "every": 4}),
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_case(folder: Path, method: str, delay: float = 0.0, **train) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    options, schedule = METHODS[method]
    model = folder / "model.py"
    model.write_text(MODEL.replace("DELAY", repr(delay)))
    spec = folder / "spec.toml"
    spec.write_text(tomli_w.dumps({
        "prune": [{"targets": ["fc*"], "density": 0.25, **options}], "schedule": schedule,
        "train": {"steps": STEPS, "batch_size": 8, "lr": 1e-2, "eval_every": 10, **train},
        "export": {"bench": False}}))
    return model, spec


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def torchrun(*args: object, reduce_scores: bool = False, **popen) -> subprocess.Popen:
    env = dict(os.environ, SPARSEC_CHECK_RANKS="1", OMP_NUM_THREADS="1")
    if reduce_scores:
        env[distributed.REDUCE_SCORES_ENV] = "1"
    return subprocess.Popen([*TORCHRUN, "--master_port", str(free_port()), "-m", "sparsec", "compile",
                             *map(str, args), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(method, parallel, reduce_scores)`: the folder of a finished 2-process run (run once per
    module); `reduce_scores`: DDP all-reduces the scores' gradients too, as FSDP does."""
    done: dict[tuple[str, str, bool], Path] = {}

    def run(method: str, parallel: str, reduce_scores: bool = False) -> Path:
        if (method, parallel, reduce_scores) not in done:
            folder = tmp_path_factory.mktemp(f"{method}-{parallel}")
            model, spec = write_case(folder / "case", method, parallel=parallel)
            out = folder / "out"
            proc = torchrun(model, "--spec", spec, "-o", out, reduce_scores=reduce_scores)
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr[-3000:]
            assert stdout.count("wrote ") == 1 and "steps trained 20" in stdout  # rank 0 alone reports
            assert sorted(p.name for p in folder.iterdir()) == ["case", "out"]  # one OUT, no leftovers
            done[method, parallel, reduce_scores] = out
        return done[method, parallel, reduce_scores]
    return run


# One method in the default run (about 30 s each on 2 cores); the others with `bin/test --slow`.
@pytest.mark.parametrize("method", [m if m == "movement" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_two_processes_keep_identical_masks_and_write_out_once(method, runs):
    out = runs(method, "ddp")
    report = json.loads((out / "report.json").read_text())
    assert report["density"] == pytest.approx(0.25, abs=0.01) and report["warnings"] == []
    losses = [json.loads(line)["loss"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert len(losses) == STEPS and all(loss == loss for loss in losses)


@pytest.mark.parametrize("method", ["movement", *(pytest.param(m, marks=pytest.mark.slow) for m in ("dynsparse", "pins", "lm"))])
def test_fsdp_trains_exactly_as_ddp(method, runs):
    """FSDP2 shards parameters, gradients and optimizer state; sparsec gathers them whole for
    prog.step() (mask updates, pins' optimizer update, dynsparse's moment resets, lm's estimates)
    and checkpoints. On two gloo processes the reduction is the same average as DDP's, so every
    tensor of the run (weights, scores, masks, method state, optimizer state) is bit-identical.
    (FSDP reduces the scores' gradients as such, so the DDP run compared does too; by default DDP
    all-reduces movement's G = dL/dW_eff alone, see test_ddp_all_reduces_g_once_for_movement.)"""
    ddp, fsdp = runs(method, "ddp", reduce_scores=True), runs(method, "fsdp")
    assert_same_training(ddp, fsdp)
    assert json.loads((fsdp / "train_state.json").read_text())["layout"] == "fsdp"


def _diverge(rank: int, world: int, store: str, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import sparsec
        from tests.helpers import mlp, mlp_input, spec_dict

        prog = sparsec.compile(mlp(0), spec_dict(["fc*"], method="magnitude", density=0.5), (mlp_input(),))
        distributed.check_masks(prog)  # identical: passes
        if rank == 1:
            next(iter(prog.masks().values())).view(-1)[0] = 1 - next(iter(prog.masks().values())).view(-1)[0]
        try:
            distributed.check_masks(prog)
            message = "no error"
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            message = str(exc)
        Path(f"{result}.{rank}").write_text(message)
    finally:
        distributed.shutdown()


def test_the_mask_check_stops_on_a_difference(tmp_path):
    mp.spawn(_diverge, args=(2, str(tmp_path / "store"), str(tmp_path / "result")), nprocs=2, join=True)
    for rank, other in ((0, 1), (1, 0)):
        message = (tmp_path / f"result.{rank}").read_text()
        assert f"masks differ across processes after step 0: site 'fc1.weight' on rank {rank} and rank {other}" \
            in message


def _gradients(rank: int, world: int, store: str, result: str, method: str) -> None:
    """Rank `rank` of the deferred-gradient check: the same Program twice, once under DDP as it
    comes (both gradients all-reduced), once placed by DistributedBackend; each process feeds its
    own batch; the gradients after the all-reduce are saved for the parent."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import sparsec
        from sparsec.spec import TrainSpec
        from sparsec.training.backend import DistributedBackend
        from tests.helpers import mlp, mlp_input, spec_dict

        torch.set_num_threads(1)
        spec = spec_dict(["fc*"], method=method, density=0.5, block=(2, 2))
        x = mlp_input(batch=4, seed=10 + rank)
        grads = {}
        for kind in ("plain", "deferred"):
            prog = sparsec.compile(mlp(0), spec, (mlp_input(),))
            with torch.no_grad():
                for scores in prog.scores().values():   # distinct scores: a mask worth the name
                    scores.copy_(torch.randn(scores.shape, generator=torch.Generator().manual_seed(3)))
            prog.update_masks()
            if kind == "plain":
                placed, backend = torch.nn.parallel.DistributedDataParallel(prog), None
            else:
                backend = DistributedBackend(TrainSpec(steps=1, device="cpu"))
                placed = backend.place(prog, lambda: prog(x).square().mean())
                assert sorted(placed.parameters_to_ignore) == sorted(f"module.{n}_scores" for n in prog.scores())
            with backend.autocast() if backend else contextlib.nullcontext():
                loss = placed(x).square().mean() + prog.regularization()   # soft movement's reaches S alone
            loss.backward()
            if backend:
                backend.finish_gradients()
            grads[kind] = {n: p.grad.clone() for n, p in prog.named_parameters()}
        torch.save(grads, f"{result}.{rank}")
    finally:
        distributed.shutdown()


@pytest.mark.parametrize("method", ["movement", pytest.param("soft_movement", marks=pytest.mark.slow)])
def test_ddp_all_reduces_g_once_for_movement(method, tmp_path):
    """Movement's two gradients are both linear in G = dL/dW_eff (Eq 2): DistributedBackend has DDP
    all-reduce G alone in the weight's gradient (half the bytes) and applies the formulas after.
    The result equals DDP's plain all-reduce of both: the weights' gradients bit for bit, the
    scores' up to float rounding (avg(G) * W vs avg(G * W)), and identical on both processes."""
    mp.spawn(_gradients, args=(2, str(tmp_path / "store"), str(tmp_path / "grads"), method), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"grads.{r}", weights_only=True) for r in (0, 1)]
    for grads in ranks:
        plain, deferred = grads["plain"], grads["deferred"]
        assert plain.keys() == deferred.keys() and any("scores" in n for n in plain)
        for name in plain:
            if "scores" in name:
                torch.testing.assert_close(deferred[name], plain[name], rtol=1e-5, atol=1e-7)
                assert deferred[name].abs().sum() > 0
            else:
                assert torch.equal(deferred[name], plain[name]), name
    for name in ranks[0]["deferred"]:
        assert torch.equal(ranks[0]["deferred"][name], ranks[1]["deferred"][name]), name


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_and_resumed_on_two_processes_is_bit_identical(parallel, tmp_path, runs):
    slow_model, slow_spec = write_case(tmp_path / "slow", "movement", delay=0.004, checkpoint_every=5,
                                       parallel=parallel)
    out = tmp_path / "b"
    ready = checkpoint.working_folder(out) / "step-0000010"
    proc = torchrun(slow_model, "--spec", slow_spec, "-o", out)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kill_all(str(slow_model))  # torchrun and both workers (which torchrun starts in their own sessions)
    proc.communicate()
    proc = torchrun(slow_model, "--spec", slow_spec, "-o", out, "--resume")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed after step 10" in stdout
    assert_same_training(runs("movement", parallel), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_one_gpu_trains_and_matches_the_cpu_run_in_density(tmp_path, sparsec_cli):
    model, spec = write_case(tmp_path, "movement")
    code, _, err = sparsec_cli("compile", model, "--spec", spec, "-o", tmp_path / "gpu", "--no-progress",
                               "--set", 'train.device="cuda"', "--set", 'train.precision="bf16"')
    assert code == 0, err
    report = json.loads((tmp_path / "gpu" / "report.json").read_text())
    assert report["density"] == pytest.approx(0.25, abs=0.01)
