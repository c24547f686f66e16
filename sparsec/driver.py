"""The whole compile, top to bottom, in one function: `run(job)`.

    spec + model ─> capture ─> FX passes: select, rewrite ─> Program ─> [train] ─> write OUT
        ─> lower: FX lowering passes ─> torch.onnx ─> ONNX passes ─> verify ─> ONNX files into OUT

`sparsec.compile` runs it up to the Program (`stop_after="rewrite"`, nothing written); the CLI
(`sparsec compile`) runs all of it with the model file's data and writes the output folder. The
training results are written before lowering, so a lowering that fails loses nothing:
`sparsec export OUT` (`export_folder`) lowers again from OUT's state. Each stage is one call into
the module that owns it:

    capture       sparsec.capture                   FX passes       sparsec.passes (+ sparsec.pipeline)
    Program       sparsec.program                   train           sparsec.training.loop
    lower         sparsec.lowering.stage            torch.onnx, ONNX passes, verify   sparsec.export
    write OUT     sparsec.outdir, sparsec.report
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx as fx

from sparsec.capture import capture
from sparsec.errors import CaptureError, UserError
from sparsec.ir import GraphInfo, format_ir, graph_info
from sparsec.modelfile import ModelFile
from sparsec.passes import STAGES, build_lowering_pipeline, build_onnx_pipeline, build_pipeline
from sparsec.pipeline import Instruments, Pass, run_pipeline
from sparsec.program import Program
from sparsec.spec import Spec
from sparsec.spec.fields import TRAIN_FIELDS
from sparsec.training import checkpoint

MODEL_FILE = "model.onnx"
DENSE_FILE = "model.dense.onnx"


@dataclass
class Job:
    """What to compile, how far, and where to."""

    model: torch.nn.Module
    spec: Spec
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    modelfile: ModelFile | None = None    # data, loss and metric of model.py (the CLI)
    stop_after: str | None = None          # a stage of STAGES; None runs them all
    dry_run: bool = False                  # run the FX passes only, write nothing
    out: Path | None = None                # the output folder (None: nothing written)
    default_out: bool = False              # OUT was not chosen: refuse another model file's OUT
    instruments: Instruments = field(default_factory=Instruments)
    progress: bool = True
    resume: bool = False                   # continue from the newest checkpoint next to OUT


@dataclass
class Outcome:
    """What a compile produced."""

    module: fx.GraphModule
    program: Program | None = None
    train: Any = None                      # sparsec.training.loop.TrainResult
    metric_dense: float | None = None
    metric_pruned: float | None = None
    lowering: dict[str, Any] | None = None  # the report's lowering section
    report: dict[str, Any] | None = None
    report_text: str = ""
    warnings: list[str] = field(default_factory=list)   # also in the report

    @property
    def info(self) -> GraphInfo:
        return graph_info(self.module)


def run(job: Job) -> Outcome:
    """Compile `job.model` as `job.spec` says, as far as `job.stop_after`. Under torchrun every
    process trains its share and only rank 0 writes OUT and lowers."""
    from sparsec.errors import ModelFileError
    from sparsec.training import distributed
    from sparsec.training.backend import backend_for
    from sparsec.training.loop import evaluate, fine_prune
    from sparsec.training.losses import objective as objective_of

    spec, inst, data = job.spec, job.instruments, job.modelfile
    full = job.stop_after in (None, "train", "lower") and not job.dry_run
    if full and spec.train is not None and data is not None and not data.has("train_data"):
        raise ModelFileError(f"{data.path}: the spec has a [train] table but {data.path.name} defines no "
                             f"train_data(): add it, or remove [train] to compile without training")
    will_train = full and spec.train is not None and data is not None
    resume = _checkpoint_to_resume(job, will_train)
    if not distributed.is_main():
        job = dataclasses.replace(job, out=None, progress=False)   # rank 0 writes OUT
    backend = backend_for(spec.train) if will_train else None
    objective = objective_of(data, job.model, job.example_kwargs) if data is not None else None
    # without [train], the evaluation batches follow [train]'s defaults
    batch_size = spec.train.batch_size if spec.train else TRAIN_FIELDS["batch_size"].default
    seed = spec.train.seed if spec.train else TRAIN_FIELDS["seed"].default
    with _claimed(job), _timings_at_end(inst):
        # The Program shares its weights with the model: measure the dense model before capture
        # (where it will train, then back to the CPU, where the example inputs are).
        metric_dense = None
        if full and data and resume is None:
            with _on(job.model, backend.device if backend is not None else None):
                metric_dense = evaluate(job.model, data, batch_size, seed, backend, objective)

        with inst.timed("capture"), _naming(data):
            gm = capture(job.model, job.example_inputs, job.example_kwargs,
                         method=spec.capture.method, dynamic=spec.capture.dynamic)
        inst.record("captured", "fx", lambda: format_ir(gm, "capture"))
        gm = run_pipeline(gm, passes_until(build_pipeline(spec, job.dry_run), job.stop_after), inst)
        outcome = Outcome(module=gm, metric_dense=metric_dense)
        if job.dry_run or "schedule_attached" not in graph_info(gm).facts:
            return _write(job, outcome)

        prog = outcome.program = Program(gm)
        prog.example_inputs, prog.example_kwargs = job.example_inputs, dict(job.example_kwargs)
        _set_teacher(prog, spec, data)
        prog.train(job.model.training)
        if will_train:
            workdir = checkpoint.working_folder(job.out) if job.out is not None else None
            if workdir is not None and resume is None:
                shutil.rmtree(workdir, ignore_errors=True)   # a fresh run: no older checkpoints
            try:
                outcome.train = fine_prune(prog, data, spec.train, progress=job.progress,
                                           dense_metric=metric_dense, backend=backend, objective=objective,
                                           workdir=workdir, resume=resume,
                                           fingerprint=checkpoint.training_fingerprint(spec))
            except BaseException:
                if workdir is not None and checkpoint.latest(workdir) is None:
                    shutil.rmtree(workdir, ignore_errors=True)   # nothing to resume from
                raise
            outcome.metric_dense = outcome.train.metric_dense
            outcome.warnings += outcome.train.notes
            prog.to("cpu")   # lowering and export run on the CPU
        elif full and data is not None:
            outcome.metric_pruned = evaluate(prog, data, batch_size, seed, objective=objective)
        outcome.warnings += density_warnings(prog)
        _write(job, outcome)                         # the training results first: never lost
        if will_train and job.out is not None:
            shutil.rmtree(checkpoint.working_folder(job.out), ignore_errors=True)

        if job.stop_after in (None, "lower") and job.out is not None:
            lower_into(job.out, prog, job.spec, job.instruments, outcome)
        return outcome


def _set_teacher(prog: Program, spec: Spec, data: ModelFile | None) -> None:
    """`[distill] teacher` other than the dense copy: model.py's teacher() or saved weights."""
    from sparsec.training.teacher import load_teacher, teacher_source

    source = teacher_source(spec)
    if source != "dense":
        teacher = load_teacher(source, data, spec.source)
        if teacher is not None:
            prog.set_teacher(teacher)


def _checkpoint_to_resume(job: Job, will_train: bool) -> Any:
    """The newest checkpoint next to OUT when `job.resume` (a UserError when there is none)."""
    if not job.resume:
        return None
    if not will_train:
        raise UserError("--resume continues a fine-pruning run: the spec needs a [train] table and "
                        "the model file a train_data()")
    if job.out is None:
        raise UserError("--resume needs the output folder that the interrupted run wrote to (-o)")
    out = job.out
    folder = checkpoint.working_folder(out)
    found = checkpoint.latest(folder)
    if found is None:
        raise UserError(f"{out}: no checkpoint to resume from in {folder} (set train.checkpoint_every "
                        f"to write them)")
    return checkpoint.load(found)


@contextlib.contextmanager
def _on(model: torch.nn.Module, device: torch.device | None) -> Iterator[None]:
    """`model` on `device` for the block, then back on the CPU (None or the CPU: no move)."""
    if device is None or device.type == "cpu":
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


def lower_into(out: Path, prog: Program, spec: Spec, instruments: Instruments, outcome: Outcome) -> None:
    """The lower stage into an OUT that holds the training results: both ONNX files, verified,
    moved in, and the report's lowering section. A failure is an ExportError that keeps OUT."""
    from sparsec import outdir
    from sparsec.report import format_report

    work = _work_folder(out)
    start = len(instruments.snapshots or [])   # the IR snapshots of the lower stage start here
    try:
        try:
            outcome.lowering = _lower(prog, spec, instruments, work, out)
        except UserError as exc:
            first = (str(exc).splitlines() or [""])[0]
            assert outcome.report is not None
            outcome.report["lowering_error"] = first
            outdir.add_files(out, {}, outcome.report, format_report(outcome.report),
                             list(instruments.snapshots or []), start)
            raise type(exc)(f"{first}; the training results are kept in {out} (lower again with "
                            f"`sparsec export {out}`)") from exc
        assert outcome.report is not None
        outcome.report.pop("lowering_error", None)
        outcome.report["lowering"] = outcome.lowering
        outcome.report_text = format_report(outcome.report)
        outdir.add_files(out, {name: work / name for name in (MODEL_FILE, DENSE_FILE)}, outcome.report,
                         outcome.report_text, list(instruments.snapshots or []), start)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_folder(out: Path, modelfile: ModelFile, spec: Spec, instruments: Instruments) -> Outcome:
    """`sparsec export OUT`: the Program rebuilt from the model file and the spec, its state loaded
    from OUT/state.safetensors, and the lower stage run again into OUT."""
    from safetensors.torch import load_file

    from sparsec import outdir
    from sparsec.inspection import OutputFolder

    folder = OutputFolder.open(out)
    with outdir.claim(out), _timings_at_end(instruments):
        outcome = run(Job(model=modelfile.model, spec=spec, example_inputs=modelfile.example_inputs,
                          example_kwargs=modelfile.example_kwargs, modelfile=modelfile,
                          stop_after="rewrite", instruments=instruments))
        prog = outcome.program
        if prog is None:
            raise UserError(f"{out}: the spec selects no sites to lower")
        state_file = out / "state.safetensors"
        try:
            state = load_file(str(state_file))
            prog.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"{state_file}: does not hold the state of this model and spec ({first}); "
                            f"pass the --model and --spec the folder was compiled with") from None
        prog.eval()
        outcome.report = folder.report()
        lower_into(out, prog, spec, instruments, outcome)
        return outcome


def density_warnings(prog: Program, tolerance: float = 0.02) -> list[str]:
    """One line per group whose masks are more than `tolerance` (2 points) off the density its
    schedule asks at the current step (a method whose density is an outcome, or too few steps),
    and one per site pruned to nothing (it computes zeros)."""
    out = []
    for plan in prog.groups:
        reached, asked = prog.group_density(plan.index), prog.target_density(plan.index)
        if abs(reached - asked) > tolerance:
            out.append(f"prune[{plan.index}] ({plan.method}) ends at density {reached:.3f}, "
                       f"{abs(reached - asked) * 100:.0f} points {'above' if reached > asked else 'below'} "
                       f"the {asked:.3f} its schedule asks at step {int(prog.step_count)}")
    empty = [name for name, density in prog.site_densities().items() if density == 0.0]
    if empty:
        out.append(f"{len(empty)} site{'s are' if len(empty) > 1 else ' is'} pruned to 0% (the layer "
                   f"outputs only its bias): {', '.join(repr(n) for n in empty[:5])}"
                   f"{', ...' if len(empty) > 5 else ''}; use scope = \"local\" or a higher density")
    return out


def _lower(prog: Program, spec: Spec, inst: Instruments, work: Path, out: Path) -> dict[str, Any]:
    """Both files, verified, into `work` (named as in `out`); returns the report's section."""
    from sparsec import export
    from sparsec.bench import bench
    from sparsec.export.options import ExportOptions
    from sparsec.report import lowering_section

    table = spec.extras["export"]
    options = ExportOptions.from_spec(table, dynamic=spec.capture.dynamic)
    pair = export.export_pair(prog.module, work / MODEL_FILE, work / DENSE_FILE, prog.example_inputs,
                              prog.example_kwargs, options, instruments=inst, shown=out / MODEL_FILE,
                              dense_shown=out / DENSE_FILE)
    timing = None
    if table["bench"]:
        with inst.timed("bench"):
            timing = bench(work / MODEL_FILE, work / DENSE_FILE, repeats=table["bench_repeats"],
                           batch=table["bench_batch"] or None, threads=options.threads or None).to_dict()
    return lowering_section(int8=options.int8, policy=options.policy, target=options.target,
                            plans=list(graph_info(pair.lowered).lowering.values()), model=pair.model,
                            dense=pair.dense, folder=work, model_file=MODEL_FILE,
                            dense_file=DENSE_FILE, bench=timing)


def _write(job: Job, outcome: Outcome) -> Outcome:
    """The report, and OUT written atomically (when the job has one and is not a dry run)."""
    from sparsec import outdir
    from sparsec.inspection import graph_record
    from sparsec.report import build_report, format_report

    if job.out is None or job.dry_run:
        return outcome
    info = outcome.info
    outcome.report = build_report(
        model_path=job.modelfile.path if job.modelfile else type(job.model).__name__, spec=job.spec,
        capture_tool=info.capture, sites=list(info.sites.values()), left_out=info.left_out,
        prog=outcome.program, result=outcome.train, stopped_after=job.stop_after,
        metric_dense=outcome.metric_dense, metric_pruned=outcome.metric_pruned,
        lowering=outcome.lowering, warnings=outcome.warnings)
    outcome.report_text = format_report(outcome.report)
    model_state = finalized_state(outcome.program, job.model) if outcome.program is not None else None
    outdir.write(job.out, outdir.Contents(
        spec=job.spec, snapshots=list(job.instruments.snapshots or []),
        graph=graph_record(outcome.module), sites=list(info.sites.values()),
        candidates=list(info.candidates.values()), left_out=info.left_out, report=outcome.report,
        report_text=outcome.report_text, prog=outcome.program, model_state=model_state,
        result=outcome.train, model_file=str(job.modelfile.path) if job.modelfile else "",
        train_state=outcome.train.final if outcome.train is not None else None,
        files=_training_logs(job.out)))
    return outcome


def _training_logs(out: Path) -> dict[str, Path]:
    """train.jsonl and tensorboard/ from the working folder next to OUT, to be moved into OUT."""
    from sparsec.training.log import JSONL, TENSORBOARD

    folder = checkpoint.working_folder(out)
    return {name: folder / name for name in (JSONL, TENSORBOARD) if (folder / name).exists()}


def finalized_state(prog: Program, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The finalized weights under the user's model's own state_dict keys (its persistent buffers
    only, tied weights under every name), so `model.load_state_dict(..., strict=True)` takes them."""
    final = prog.finalize().state_dict()
    return {key: final.get(key, value) for key, value in model.state_dict().items()}


@contextlib.contextmanager
def _claimed(job: Job) -> Iterator[None]:
    if job.out is None or job.dry_run:
        yield
        return
    from sparsec import outdir

    model_file = str(job.modelfile.path) if job.default_out and job.modelfile else None
    with outdir.claim(job.out, model_file):
        yield


@contextlib.contextmanager
def _naming(modelfile: ModelFile | None) -> Iterator[None]:
    """A capture error names the model file it is about."""
    try:
        yield
    except CaptureError as exc:
        if modelfile is None or str(exc).startswith(str(modelfile.path)):
            raise
        raise CaptureError(f"{modelfile.path}: {exc}") from exc


@contextlib.contextmanager
def _timings_at_end(instruments: Instruments) -> Iterator[None]:
    try:
        yield
    finally:
        instruments.report_timings()


def _work_folder(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.onnx-", dir=out.parent))


# ------------------------------------------------------------------------------- the pipeline
def passes_until(passes: list[Pass], stage: str | None) -> list[Pass]:
    """The passes up to and including those of `stage` (all of them for None)."""
    if stage is None:
        return list(passes)
    last = STAGES.index(stage)
    return [p for p in passes if STAGES.index(p.stage) <= last]


def pipeline(spec: Spec, stop_after: str | None = None, dry_run: bool = False) -> list[Pass]:
    """Every pass a compile of `spec` runs, FX and ONNX, in order (for --print-pipeline and for
    checking --print-after names)."""
    front = passes_until(build_pipeline(spec, dry_run), stop_after)
    if dry_run or stop_after not in (None, "lower"):
        return front
    from sparsec.export.options import ExportOptions

    options = ExportOptions.from_spec(spec.extras["export"], dynamic=spec.capture.dynamic)
    return front + build_lowering_pipeline(**options.lowering()) + build_onnx_pipeline()


def format_pipeline(passes: list[Pass]) -> str:
    lines = ["pipeline:"]
    lines += [f"  {i:2d}. [{p.stage}{', ' + p.kind if p.kind != 'fx' else ''}] {p.describe()}"
              for i, p in enumerate(passes, 1)]
    return "\n".join(lines)
