"""The stage line (sparsec.progress.StageLine): drawn on a terminal while a stage runs and erased
after it, silent on anything that is not a terminal; the instruments start and stop it around
timed stages and passes."""
from __future__ import annotations

import io
import time

from sparsec.pipeline import Instruments
from sparsec.progress import StageLine


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stage_line_draws_the_innermost_stage_then_erases_it():
    screen = Terminal()
    line = StageLine(stream=screen, interval=0.02)
    line.start("lower")
    time.sleep(0.1)
    line.start("torch.onnx export")
    time.sleep(0.1)
    line.stop()
    line.stop()
    text = screen.getvalue()
    assert "lower" in text and "torch.onnx export" in text and " s" in text
    assert text.endswith("\r\x1b[K")                         # the line is erased at the end
    assert line._thread is None


def test_stage_line_is_silent_off_a_terminal_or_when_disabled():
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):
        line = StageLine(enabled=enabled, stream=stream, interval=0.01)
        line.start("capture")
        time.sleep(0.05)
        line.stop()
        assert stream.getvalue() == ""


def test_instruments_show_timed_stages():
    class Recorder:
        def __init__(self) -> None:
            self.events: list[str] = []

        def start(self, name: str) -> None:
            self.events.append(f"+{name}")

        def stop(self) -> None:
            self.events.append("-")

    recorder = Recorder()
    inst = Instruments(stages=recorder)
    with inst.timed("bench"):
        pass
    assert recorder.events == ["+bench", "-"] and "bench" in inst.timings
