"""The output folder of `sparsec compile`, written atomically.

Everything is built in a temporary sibling folder and renamed into place, so OUT is either the
previous complete folder or the new complete one, never half-written: a compile that fails keeps
the old OUT. The training results are written before lowering; the ONNX files are then moved in
one by one and the report replaced last (`add_files`), so a lowering that fails keeps them.

sparsec recognises its own folders by the marker file `.sparsec` it writes (which also names the
model file); a folder without it is never replaced, and the default OUT of one model file is not
taken over by another. `claim(out)` is held for the whole compile: it checks up front that OUT
can be written, locks it against a second compile (`.<OUT>.lock`, an flock that dies with the
process), and removes the temporary siblings a killed compile left behind.

    OUT/spec.resolved.toml      the spec with every default filled
    OUT/ir/00_captured.py.txt   the IR right after capture, then NN_<pass>.py.txt after each FX pass
                                (the lowering ones included) and NN_<pass>.onnx.txt after the
                                torch.onnx export and each ONNX pass
    OUT/graph.json              the final graph's nodes (with sparsec roles) and edges
    OUT/sites.json              sites, candidates and the weights left out with the reason
    OUT/state.safetensors       Program.state_dict(): weights, scores, masks, schedule position
    OUT/train_state.safetensors the optimizer's tensors, random generators (sparsec.training.checkpoint)
    OUT/train_state.json        the rest of the training state: with state.safetensors, enough to resume
    OUT/train.json, train.jsonl the history of training (train.jsonl: one line per step, as it ran)
    OUT/model.safetensors       the finalized model's state_dict (masks baked in)
    OUT/report.json, report.txt the compile report
    OUT/report.html             the report with pictures (self-contained: curves, per-layer densities,
                                masks, lowering, files, links to ir/); `sparsec inspect OUT --html`
                                writes it again
    OUT/loss.png                loss and density per step
    OUT/model.onnx              the lowered model (block-sparse ops), verified against PyTorch
    OUT/model.dense.onnx        the same model exported dense, for comparison
    OUT/.sparsec                the marker: sparsec wrote this folder, for this model file
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomli_w
import torch

from sparsec.errors import UserError
from sparsec.htmlreport import write_report
from sparsec.inspection import IR_DIR, MARKER, ir_file_name
from sparsec.paths import file_mode, save_tensors, umask
from sparsec.pipeline import Snapshot
from sparsec.site import Site
from sparsec.spec import Spec


@dataclass
class Contents:
    """Everything a compile produced that goes into OUT."""

    spec: Spec
    snapshots: list[Snapshot]              # the IR after capture and after every pass, in order
    graph: dict[str, Any]                  # inspection.graph_record
    sites: list[Site]
    candidates: list[Site]
    left_out: dict[str, str]
    report: dict[str, Any]
    report_text: str
    prog: Any = None                       # the Program (None when compilation stopped before it)
    model_state: dict[str, torch.Tensor] | None = None  # the finalized model, the user's keys
    result: Any = None                     # sparsec.training.loop.TrainResult
    model_file: str = ""                   # the model file, recorded in the marker
    files: dict[str, Path] = dataclasses.field(default_factory=dict)  # name in OUT -> file to move in
    train_state: Any = None                # checkpoint.Payload of the end of training


def default_out(model_path: str | Path) -> Path:
    return Path("out") / Path(model_path).stem


def marker(out: Path) -> dict[str, Any] | None:
    """OUT's marker (what sparsec wrote there), or None when OUT has none."""
    try:
        data = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("writer") == "sparsec" else None


def check_replaceable(out: Path, model_file: str | None = None) -> None:
    """Refuse to replace anything that is not a sparsec output folder, or (for a default OUT,
    `model_file` given) one that sparsec wrote for another model file."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    if not any(out.iterdir()):
        return
    found = marker(out)
    if found is None:
        raise UserError(f"{out}: exists and is not a sparsec output folder (no {MARKER} marker); "
                        f"choose another -o or remove it")
    if model_file is not None and found.get("model") not in (None, str(Path(model_file).resolve())):
        raise UserError(f"{out}: holds the output of {found.get('model')}, not of {model_file}; "
                        f"pass -o to choose where this one goes")


@contextlib.contextmanager
def claim(out: Path, model_file: str | None = None) -> Iterator[None]:
    """Hold OUT for one compile: writable, not another's, locked, stale temporaries removed."""
    check_replaceable(out, model_file)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out.parent}: cannot create the folder for OUT ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK | os.X_OK)):
        raise UserError(f"{out}: cannot be written (permission denied); choose another -o")
    lock_path = out.parent / f".{out.name}.lock"
    handle = _lock(lock_path, out)
    try:
        for stale in out.parent.glob(f".{out.name}.*-*"):
            if stale.is_dir() and stale.name.split(".")[-1].split("-")[0] in ("tmp", "onnx", "old"):
                shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        handle.close()


def _lock(path: Path, out: Path):  # noqa: ANN202 - an open file
    while True:
        handle = open(path, "a")  # noqa: SIM115 - held until release
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError(f"{out}: another sparsec compile is writing it; wait for it or choose "
                            f"another -o") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder removed after we opened it
            return handle
        handle.close()


def write(out: str | Path, contents: Contents) -> Path:
    """Write `contents` to OUT atomically; returns OUT."""
    out = Path(out)
    check_replaceable(out)
    write_atomically(out, lambda folder: _fill(folder, contents, out.name))
    return out


def add_files(out: Path, files: dict[str, Path], report: dict[str, Any], report_text: str,
              snapshots: list[Snapshot] = (), start: int = 0) -> None:  # type: ignore[assignment]
    """Move `files` into an OUT sparsec wrote (each whole, by rename), write the IR snapshots from
    index `start` on in place of those there, then replace the report."""
    for path in (out / IR_DIR).glob("*.txt"):
        if path.name[:2].isdigit() and int(path.name[:2]) >= start:
            path.unlink()
    for index, snapshot in enumerate(snapshots[start:], start):
        _replace_text(out / IR_DIR / ir_file_name(index, snapshot.name, snapshot.suffix), snapshot.text)
    for name, source in files.items():
        os.chmod(source, file_mode())
        os.replace(source, out / name)
    _replace_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    _replace_text(out / "report.txt", report_text + "\n")
    write_report(out)


def _replace_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomically(out: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` on a fresh sibling folder, then swap it in for `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; OUT is an ordinary folder
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fill(folder: Path, c: Contents, name: str) -> None:
    _write_json(folder / MARKER, {"writer": "sparsec", "model": str(Path(c.model_file).resolve())
                                  if c.model_file else None})
    (folder / "spec.resolved.toml").write_bytes(tomli_w.dumps(c.spec.to_dict()).encode())
    (folder / IR_DIR).mkdir()
    for index, snapshot in enumerate(c.snapshots):
        (folder / IR_DIR / ir_file_name(index, snapshot.name, snapshot.suffix)).write_text(snapshot.text)
    _write_json(folder / "graph.json", c.graph)
    _write_json(folder / "sites.json", {"sites": [_site(s) for s in c.sites],
                                        "candidates": [_site(s) for s in c.candidates],
                                        "left_out": c.left_out})
    if c.prog is not None:
        save_tensors(c.prog.state_dict(), folder / "state.safetensors")
        save_tensors(c.model_state if c.model_state is not None else c.prog.finalize().state_dict(),
                     folder / "model.safetensors")
    if c.train_state is not None:
        from sparsec.training import checkpoint

        save_tensors(c.train_state.tensors, folder / checkpoint.TENSORS_FILE)
        _write_json(folder / checkpoint.JSON_FILE, c.train_state.meta)
    if c.result is not None and c.result.losses:
        _write_json(folder / "train.json", c.result.to_dict())
        plot_loss(c.result, folder / "loss.png")
    for name, source in c.files.items():
        if source.is_file():
            os.chmod(source, file_mode())
        shutil.move(str(source), str(folder / name))
    _write_json(folder / "report.json", c.report)
    (folder / "report.txt").write_text(c.report_text + "\n")
    write_report(folder, name=name)   # last: it pictures everything above


def _site(site: Site) -> dict[str, Any]:
    data = dataclasses.asdict(site)
    data["numel"] = site.numel
    return data


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot_loss(result: Any, path: Path) -> None:
    """loss.png: loss and density per step."""
    from sparsec.htmlreport.plots import pyplot

    plt = pyplot()
    steps = range(1, len(result.losses) + 1)
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(steps, result.losses, color="tab:blue", linewidth=0.8)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss", color="tab:blue")
    density_axis = loss_axis.twinx()
    density_axis.plot(steps, result.densities, color="tab:red")
    density_axis.set_ylabel("density", color="tab:red")
    density_axis.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
