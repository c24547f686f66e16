"""The `sparsec` command line: validate, compile, inspect, bench.

Exit codes: 0 success, 2 a user error (one line per problem on stderr, `sparsec: error: ...`, no
traceback unless --debug), 1 an internal error (a bug in sparsec: re-run with --debug).
The compile flow itself is `run_compile`, one straight function.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from sparsec.errors import SpecError, UserError
from sparsec.passes import STAGES

PROG = "sparsec"


# ------------------------------------------------------------------------------------- compile
@dataclass
class CompileOptions:
    model: str
    spec: str
    out: str | None = None
    dry_run: bool = False
    print_after: list[str] = field(default_factory=list)
    print_pipeline: bool = False
    time_passes: bool = False
    stop_after: str | None = None
    progress: bool = True


def run_compile(opts: CompileOptions, stdout: TextIO | None = None) -> Path | None:
    """spec + model.py -> capture -> passes -> [train] -> output folder. Returns OUT (None for a
    dry run)."""
    from sparsec import modelfile, outdir
    from sparsec.capture import capture
    from sparsec.inspection import graph_record
    from sparsec.ir import format_ir, graph_info
    from sparsec.export import export_stage, lowering_pipeline, options_from_spec
    from sparsec.passes import build_pipeline
    from sparsec.pipeline import Instruments, run_pipeline
    from sparsec.program import Program
    from sparsec.report import build_report, format_report
    from sparsec.spec import load_spec
    from sparsec.train import evaluate, fine_prune

    stdout = stdout or sys.stdout
    spec = load_spec(opts.spec)
    passes = build_pipeline(spec)
    export_options = options_from_spec(spec.extras.get("export"), dynamic=spec.capture.dynamic)
    lowering = lowering_pipeline(export_options)
    print_after = _check_print_after(opts.print_after, passes + lowering)
    passes = passes_until(passes, opts.stop_after)
    will_lower = opts.stop_after in (None, "lower") and not opts.dry_run
    if opts.print_pipeline:
        stdout.write(format_pipeline(passes + (lowering if will_lower else [])) + "\n")
    out = Path(opts.out) if opts.out else outdir.default_out(opts.model)
    if not opts.dry_run:
        outdir.check_replaceable(out)  # fail before the expensive part

    mf = modelfile.load(opts.model)
    full_run = opts.stop_after in (None, "train", "lower") and not opts.dry_run
    will_train = full_run and spec.train is not None and mf.has("train_data")
    if full_run and spec.train is not None and not will_train:
        print(f"{PROG}: note: {mf.path} has no train_data(): skipping [train]", file=sys.stderr)
    batch_size, seed = (spec.train.batch_size, spec.train.seed) if spec.train else (32, 0)
    # The Program shares its weights with the model: measure the dense model before capture.
    metric_dense = evaluate(mf.model, mf, batch_size, seed) if full_run else None

    gm = capture(mf.model, mf.example_inputs, mf.example_kwargs,
                 method=spec.capture.method, dynamic=spec.capture.dynamic)
    snapshots = {"captured": format_ir(gm, "capture")}
    instruments = Instruments(print_after=print_after, time_passes=opts.time_passes,
                              stream=stdout, snapshots=snapshots)
    gm = run_pipeline(gm, passes, instruments)
    info = graph_info(gm)
    if opts.dry_run:
        stdout.write(format_dry_run(list(info.sites.values()), info.left_out) + "\n")
        return None

    prog = Program(gm) if "schedule_attached" in info.facts else None
    result, metric_pruned = None, None
    if prog is not None and will_train:
        result = fine_prune(prog, mf, spec.train, progress=opts.progress, dense_metric=metric_dense)
    elif prog is not None and full_run:
        metric_pruned = evaluate(prog, mf, batch_size, seed)
    files, lowered, work = {}, None, None
    if prog is not None and will_lower:  # the lower stage: model.onnx and model.dense.onnx
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.onnx-", dir=out.parent))
        table = spec.extras.get("export") or {}
        try:
            # print-after / time-passes for the lowering passes; ir/ keeps the rewritten program
            lower_instruments = Instruments(print_after=print_after, time_passes=opts.time_passes,
                                            stream=stdout)
            lowered = export_stage(prog.module, mf.example_inputs, mf.example_kwargs, export_options,
                                   work, lower_instruments,
                                   bench_repeats=table.get("bench_repeats", 30) if table.get("bench", True) else 0,
                                   bench_batch=table.get("bench_batch", 0) or None)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        files = {name: work / name for name in ("model.onnx", "model.dense.onnx")}
    sites = list(info.sites.values())
    report = build_report(model_path=opts.model, spec=spec, capture_tool=info.capture, sites=sites,
                          left_out=info.left_out, prog=prog, result=result,
                          stopped_after=opts.stop_after, metric_dense=metric_dense,
                          metric_pruned=metric_pruned, lowering=lowered)
    text = format_report(report)
    outdir.write(out, outdir.Contents(
        spec=spec, snapshots=list(snapshots.items()), graph=graph_record(gm), sites=sites,
        candidates=list(info.candidates.values()), left_out=info.left_out, report=report,
        report_text=text, prog=prog, result=result, files=files))
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    stdout.write(text + f"\n\nwrote {out}\n")
    return out


def passes_until(passes: list, stage: str | None) -> list:
    """The passes up to and including those of `stage` (all of them for None)."""
    if stage is None:
        return list(passes)
    last = STAGES.index(stage)
    return [p for p in passes if STAGES.index(p.stage) <= last]


def format_pipeline(passes: list) -> str:
    lines = ["pipeline:"]
    lines += [f"  {i:2d}. [{p.stage}] {p.describe()}" for i, p in enumerate(passes, 1)]
    return "\n".join(lines)


def _check_print_after(names: list[str], passes: list) -> frozenset[str]:
    wanted = {name.strip() for item in names for name in item.split(",") if name.strip()}
    known = [p.name for p in passes]
    unknown = sorted(wanted - set(known) - {"all"})
    if unknown:
        raise UserError(f"--print-after: unknown pass {', '.join(unknown)} "
                        f"(passes: {', '.join(known)}, or all)")
    return frozenset(wanted)


def format_dry_run(sites: list, left_out: dict[str, str]) -> str:
    header = ("site", "shape", "block", "parameters", "group", "method")
    rows = [(s.name, "x".join(map(str, s.shape)), "x".join(map(str, s.block)), f"{s.numel:,}",
             str(s.group), str(s.method)) for s in sites]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    total = sum(s.numel for s in sites)
    lines = [f"{len(sites)} site{'' if len(sites) == 1 else 's'}, {total:,} weights", line(header),
             line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]
    lines.append(f"left out ({len(left_out)}):" if left_out else "left out: none")
    lines += [f"  {name}: {why}" for name, why in left_out.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ commands
def cmd_validate(args: argparse.Namespace) -> int:
    from sparsec.spec import format_summary, load_spec

    print(format_summary(load_spec(args.spec)))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    opts = CompileOptions(model=args.model, spec=args.spec, out=args.out, dry_run=args.dry_run,
                          print_after=args.print_after or [], print_pipeline=args.print_pipeline,
                          time_passes=args.time_passes, stop_after=args.stop_after,
                          progress=not args.no_progress)
    run_compile(opts)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sparsec.inspection import OutputFolder, inspect_graph, inspect_text

    folder = OutputFolder.open(args.out)
    if args.format == "text":
        text = inspect_text(folder, stage=args.stage, diff=args.diff)
    else:
        text = inspect_graph(folder, args.format)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from sparsec.bench import bench, format_bench

    result = bench(args.model, dense=args.dense, threads=args.threads, repeats=args.repeats,
                   kernel=not args.no_kernel, batch=args.batch)
    print(format_bench(result))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and warnings")
    parser = argparse.ArgumentParser(prog=PROG, parents=[common],
                                     description="A compiler for neural-network sparsity.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", parents=[common], help="check a spec and summarize it")
    validate.add_argument("spec", metavar="SPEC")
    validate.set_defaults(handler=cmd_validate)

    comp = sub.add_parser("compile", parents=[common], help="capture, rewrite, fine-prune a model")
    comp.add_argument("model", metavar="MODEL.py")
    comp.add_argument("--spec", required=True, metavar="SPEC")
    comp.add_argument("-o", "--out", metavar="OUT", help="output folder (default: out/<model file stem>)")
    comp.add_argument("--dry-run", action="store_true", help="list the sites and stop; write nothing")
    comp.add_argument("--print-after", action="append", metavar="PASS|all",
                      help="print the IR after a pass (repeatable, or a comma list)")
    comp.add_argument("--print-pipeline", action="store_true", help="print the pass list first")
    comp.add_argument("--time-passes", action="store_true", help="print each pass's time")
    comp.add_argument("--stop-after", choices=STAGES, metavar="STAGE",
                      help=f"stop after a stage ({', '.join(STAGES)}) and write what exists")
    comp.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    comp.set_defaults(handler=cmd_compile)

    insp = sub.add_parser("inspect", parents=[common], help="show an output folder")
    insp.add_argument("out", metavar="OUT")
    insp.add_argument("--format", choices=("text", "dot", "graphml"), default="text")
    insp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    insp.add_argument("--diff", action="store_true", help="unified diff of the captured vs final IR")
    insp.add_argument("--stage", metavar="NAME", help="the IR after this pass (or 'captured')")
    insp.set_defaults(handler=cmd_inspect)

    ben = sub.add_parser("bench", parents=[common], help="time a block-sparse ONNX file against its dense export")
    ben.add_argument("model", metavar="MODEL.onnx")
    ben.add_argument("--dense", metavar="DENSE.onnx", help="the dense file (default: MODEL.dense.onnx beside MODEL)")
    ben.add_argument("--threads", type=int, metavar="N", help="onnxruntime intra-op threads")
    ben.add_argument("--repeats", type=int, default=50, metavar="N", help="interleaved rounds (default 50)")
    ben.add_argument("--batch", type=int, metavar="N", help="first input dimension (default: the example inputs')")
    ben.add_argument("--no-kernel", action="store_true", help="do not time sparsec's native kernel")
    ben.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ben.set_defaults(handler=cmd_bench)
    return parser


def _error_lines(exc: UserError) -> list[str]:
    if isinstance(exc, SpecError):
        return [" ".join(line.split()) for line in exc.errors] or ["invalid spec"]
    return [" ".join(str(exc).split()) or type(exc).__name__]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    with warnings.catch_warnings():
        if not debug:  # torch's deprecation chatter is not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        try:
            return args.handler(args)
        except UserError as exc:
            if debug:
                traceback.print_exc()
            for line in _error_lines(exc):
                print(f"{PROG}: error: {line}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - a bug in sparsec: say so in one line
            if debug:
                traceback.print_exc()
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            print(f"{PROG}: internal error: {type(exc).__name__}: {first} (a bug in sparsec; "
                  f"re-run with --debug for the traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
