"""A one-line status on the terminal while a long stage runs (capture, the passes, torch.onnx
export, verification, benchmarking): a spinner, the stage and its seconds, redrawn in place on
stderr and erased when the stage ends. Nothing at all when stderr is not a terminal (logs, pipes,
tests) or with `--no-progress`. Fine-pruning has its own bar (sparsec.training.log.Progress).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

FRAMES = "|/-\\"


class StageLine:
    """`start(name)` / `stop()` around a stage (nested stages show the innermost)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, interval: float = 0.25):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and _is_tty(self.stream)
        self.interval = interval
        self._stack: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._stack.append((name, time.monotonic()))
            if self._thread is None:
                self._wake.clear()
                self._thread = threading.Thread(target=self._spin, name="sparsec-progress", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._stack:
                self._stack.pop()
            thread = self._thread if not self._stack else None
            if thread is not None:
                self._thread = None
                self._wake.set()
        if thread is not None:
            thread.join()

    def _spin(self) -> None:
        frame = 0
        while not self._wake.wait(self.interval if frame else 0.0):
            with self._lock:
                if not self._stack:
                    break
                name, since = self._stack[-1]
                self._write(f"\r\x1b[K{FRAMES[frame % len(FRAMES)]} {name} {time.monotonic() - since:4.1f} s")
            frame += 1
        with self._lock:
            self._write("\r\x1b[K")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):   # a closed terminal: the compile goes on
            self.enabled = False


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
