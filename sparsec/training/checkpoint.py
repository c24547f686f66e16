"""Checkpoints of fine-pruning: everything a run needs to continue bit-exactly where it stopped.

A checkpoint is a folder of three files (the same three that OUT holds at the end of training):

    state.safetensors        Program.state_dict(): weights, scores, masks, method state, step
    train_state.safetensors  the optimizer's tensors (Adam moments, step counts), the random
                             generators' states (torch CPU and CUDA, per process), and the PINS
                             self-regularization checkpoint
    train_state.json         the optimizer's other state and param groups, the learning-rate
                             scheduler, the gradient scaler, Python's and numpy's generators, the
                             data position of each stream, the history so far (losses, densities,
                             metrics), and what it was trained with (spec keys, process count)

Tensors are read back with safetensors only; nothing is unpickled. During `sparsec compile`,
`[train] checkpoint_every = n` writes one every n optimizer steps into the hidden working folder
next to OUT (`.<OUT>.train/step-NNNNNNN/`, written as a temporary folder and renamed, so a kill at
any moment leaves the previous one whole; the last two are kept); `sparsec compile --resume`
continues from the newest. Through the API:

    prog = sparsec.compile(model, spec, example_inputs)
    optimizer = make_optimizer(prog, spec.train); scheduler = lr.scheduler(optimizer, spec.train)
    restored = checkpoint.load("OUT")              # or a step folder
    restored.restore(prog, optimizer, scheduler)   # Program, optimizer, scheduler, RNG
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsec.errors import UserError
from sparsec.paths import file_mode, save_tensors, umask

STATE_FILE = "state.safetensors"
TENSORS_FILE = "train_state.safetensors"
JSON_FILE = "train_state.json"
FORMAT = 1
KEEP = 2  # checkpoints kept in the working folder
# [train] keys that do not change what training computes (`parallel` only within rounding, and
# resuming under another layout says so): a resumed run may change them
NEUTRAL_TRAIN_KEYS = ("checkpoint_every", "log_every", "tensorboard", "check_ranks", "parallel")


def working_folder(out: Path) -> Path:
    """Where `sparsec compile` writes the checkpoints of OUT while it trains."""
    return out.parent / f".{out.name}.train"


def training_fingerprint(spec: Any) -> dict[str, Any]:
    """The resolved spec's keys that a checkpoint must agree with to be resumed: everything but
    the [export] table and the [train] keys that do not change the computation."""
    data = spec.to_dict()
    data.pop("export", None)
    for key in NEUTRAL_TRAIN_KEYS:
        (data.get("train") or {}).pop(key, None)
    return json.loads(json.dumps(data))


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two JSON values differ (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if a == b else (path or "(the spec)")


# ------------------------------------------------------------------------------ random state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's random generators: torch's (CPU and every CUDA device) as tensors, Python's
    and numpy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][:torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- optimizer state
def split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict as safetensors tensors and JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        rest = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                rest[key] = value
        meta["state"][str(index)] = rest
    return tensors, meta


def join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(rest) for i, rest in meta["state"].items()}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    head = prefix + "."
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


# ------------------------------------------------------------------------------- the payload
@dataclass
class Payload:
    """What a checkpoint holds, in memory: the Program's state, the other tensors, and JSON."""

    program: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def write(self, folder: Path) -> None:
        """The three files into `folder` (which exists)."""
        save_tensors(self.program, folder / STATE_FILE)
        save_tensors(self.tensors, folder / TENSORS_FILE)
        (folder / JSON_FILE).write_text(json.dumps(self.meta, indent=1) + "\n")
        os.chmod(folder / JSON_FILE, file_mode())


def capture(step: int, prog: Any, optimizer: torch.optim.Optimizer, scheduler: Any, backend: Any,
            self_reg: Any, positions: dict[str, int], history: dict[str, Any],
            fingerprint: dict[str, Any], rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]
            ) -> Payload:
    """The checkpoint of a run after optimizer step `step`. `rng` holds every process's
    generators (rank order)."""
    opt_tensors, opt_meta = split_optimizer(optimizer.state_dict())
    tensors = _prefixed("optimizer", opt_tensors)
    rng_meta = []
    for rank, (rank_tensors, rank_meta) in enumerate(rng):
        tensors.update(_prefixed(f"rng.{rank}", rank_tensors))
        rng_meta.append(rank_meta)
    meta: dict[str, Any] = {
        "format": FORMAT, "step": step, "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "backend": backend.state_dict(), "rng": rng_meta, "positions": positions,
        "history": history, "spec": fingerprint, "world": len(rng), "layout": backend.name,
    }
    if self_reg is not None:
        tensors.update(_prefixed("self_regularization", self_reg.checkpoint.state_dict()))
        meta["self_regularization"] = {"best": self_reg.best, "refreshes": self_reg.refreshes}
    return Payload({k: v for k, v in prog.state_dict().items()}, tensors, meta)


@dataclass
class Restored:
    """A checkpoint read back from disk (safetensors and JSON only)."""

    folder: Path
    payload: Payload
    notes: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.payload.step

    def restore(self, prog: Any, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                backend: Any = None, self_reg: Any = None, rank: int = 0, rng: bool = True) -> None:
        """Load the checkpoint into a freshly built Program, optimizer, scheduler and backend (and
        the random generators of process `rank`; call that last, after skipping the data)."""
        meta, tensors = self.payload.meta, self.payload.tensors
        try:
            prog.load_state_dict(self.payload.program, strict=True)
            if optimizer is not None:
                optimizer.load_state_dict(join_optimizer(_unprefixed("optimizer", tensors), meta["optimizer"]))
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"{self.folder}: does not hold the training state of this model and spec "
                            f"({first})") from None
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        if backend is not None:
            backend.load_state_dict(meta.get("backend") or {})
        if self_reg is not None and "self_regularization" in meta:
            self_reg.checkpoint.load_state_dict(_unprefixed("self_regularization", tensors), strict=True)
            self_reg.best = meta["self_regularization"]["best"]
            self_reg.refreshes = meta["self_regularization"]["refreshes"]
        if rng:
            self.restore_rng(rank)

    def restore_rng(self, rank: int = 0) -> None:
        meta, tensors = self.payload.meta, self.payload.tensors
        if rank < len(meta["rng"]):
            set_rng_state(_unprefixed(f"rng.{rank}", tensors), meta["rng"][rank])


def load(folder: str | os.PathLike) -> Restored:
    """A checkpoint folder (or OUT) read back; a missing or damaged file is a UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / JSON_FILE).read_text())
        program = load_file(str(folder / STATE_FILE))
        tensors = load_file(str(folder / TENSORS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{folder}: not a readable sparsec checkpoint ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{folder / JSON_FILE}: not a sparsec checkpoint of format {FORMAT}")
    return Restored(folder, Payload(program, tensors, meta))


# -------------------------------------------------------------------------- the working folder
def save(folder: Path, payload: Payload) -> Path:
    """Write `payload` as `folder/step-NNNNNNN` atomically (a temporary folder renamed into place)
    and keep the newest KEEP checkpoints; returns the checkpoint's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{payload.step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=folder))
    try:
        payload.write(tmp)
        os.chmod(tmp, 0o777 & ~umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoints(folder)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob("step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints in a working folder, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest(folder: Path) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None
