"""What fine-pruning shows and records while it runs: a progress bar (or a few log lines when
stderr is not a terminal), and one JSON line per optimizer step (loss, density, learning rates,
metric when evaluated) in `train.jsonl`, mirrored to TensorBoard with `[train] tensorboard = true`
when `torch.utils.tensorboard` can be imported.

`sparsec compile` writes train.jsonl (and tensorboard/) into the working folder next to OUT while it
trains, so they can be followed live, and moves them into OUT at the end. A resumed run drops the
lines after the step it resumes from.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

JSONL = "train.jsonl"
TENSORBOARD = "tensorboard"


class Progress:
    """A tqdm bar on a terminal; otherwise a few log lines on stderr."""

    def __init__(self, total: int, enabled: bool, log_every: int, start: int = 0):
        from tqdm import tqdm

        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, disable=not tty, desc="fine-pruning", unit="step",
                        dynamic_ncols=True, leave=False)
        self.log = enabled and not tty
        self.every = max(1, log_every, math.ceil(total / 10))
        self.total = total

    def update(self, step: int, loss: float, density: float, metric: float | None) -> None:
        shown = {"loss": f"{loss:.4f}", "density": f"{density:.3f}"}
        if metric is not None:
            shown["metric"] = f"{metric:.4f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        if self.log and (step % self.every == 0 or step == self.total):
            text = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class StepLog:
    """train.jsonl (and TensorBoard) in `folder`; `resume_step` drops what came after it."""

    def __init__(self, folder: Path, tensorboard: bool = False, resume_step: int = 0):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / JSONL
        kept = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    break
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")  # noqa: SIM115 - closed by close()
        self.writer = None
        self.note: str | None = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                self.note = (f"train.tensorboard = true, but torch.utils.tensorboard cannot be imported "
                             f"({exc}); the steps are in {JSONL} only (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(str(folder / TENSORBOARD), purge_step=resume_step + 1 or None)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key == "step" or value is None:
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/{i}", v, step)
                else:
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
