"""The output folder of `sparsec compile`, written atomically.

Everything is built in a temporary sibling folder and renamed into place, so OUT is either the
previous complete folder or the new complete one, never half-written: a compile that fails keeps
the old OUT. A folder that exists but was not written by sparsec is never replaced.

    OUT/spec.resolved.toml      the spec with every default filled
    OUT/ir/00_captured.py.txt   the IR right after capture, then NN_<pass>.py.txt after each FX pass
                                (the lowering ones included) and NN_<pass>.onnx.txt after the
                                torch.onnx export and each ONNX pass
    OUT/graph.json              the final graph's nodes (with sparsec roles) and edges
    OUT/sites.json              sites, candidates and the weights left out with the reason
    OUT/state.safetensors       Program.state_dict(): weights, scores, masks, schedule position
    OUT/model.safetensors       the finalized model's state_dict (masks baked in)
    OUT/report.json, report.txt the compile report
    OUT/loss.png                loss and density per step (only when matplotlib is installed)
    OUT/model.onnx              the lowered model (block-sparse ops), verified against PyTorch
    OUT/model.dense.onnx        the same model exported dense, for comparison
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomli_w
import torch

from sparsec.errors import UserError
from sparsec.inspection import IR_DIR, MARKERS, ir_file_name
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
    result: Any = None                     # sparsec.training.loop.TrainResult
    files: dict[str, Path] = dataclasses.field(default_factory=dict)  # name in OUT -> file to move in


def default_out(model_path: str | Path) -> Path:
    return Path("out") / Path(model_path).stem


def write(out: str | Path, contents: Contents) -> Path:
    """Write `contents` to OUT atomically; returns OUT."""
    out = Path(out)
    check_replaceable(out)
    write_atomically(out, lambda folder: _fill(folder, contents))
    return out


def check_replaceable(out: Path) -> None:
    """Refuse to replace anything that is not a previous sparsec output folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another -o")
    if any(out.iterdir()) and not all((out / m).is_file() for m in MARKERS):
        raise UserError(f"{out}: exists and is not a sparsec output folder; choose another -o "
                        f"or remove it")


def write_atomically(out: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp)` on a fresh sibling folder, then swap it in for `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT is an ordinary folder
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


def _fill(folder: Path, c: Contents) -> None:
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
        save_tensors(c.prog.finalize().state_dict(), folder / "model.safetensors")
    if c.result is not None and c.result.losses:
        _write_json(folder / "train.json", c.result.to_dict())
        plot_loss(c.result, folder / "loss.png")
    for name, source in c.files.items():
        shutil.move(str(source), str(folder / name))
    _write_json(folder / "report.json", c.report)
    (folder / "report.txt").write_text(c.report_text + "\n")


def _site(site: Site) -> dict[str, Any]:
    data = dataclasses.asdict(site)
    data["numel"] = site.numel
    return data


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors needs contiguous tensors that share no storage: save private copies."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().clone().contiguous() for name, t in state.items()
               if isinstance(t, torch.Tensor)}
    save_file(tensors, str(path), metadata={"format": "pt", "writer": "sparsec"})


def plot_loss(result: Any, path: Path) -> bool:
    """loss.png: loss and density per step; skipped (False) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
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
    return True
