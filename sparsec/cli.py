"""The `sparsec` command line: validate, compile, inspect, bench.

Exit codes: 0 success, 2 a user error (one line per problem on stderr, `sparsec: error: ...`, no
traceback unless --debug), 1 an internal error (a bug in sparsec: re-run with --debug).
This module only parses arguments and prints; the compile itself is sparsec.driver.run.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sparsec.errors import ModelFileError, SpecError, UserError
from sparsec.pipeline import STAGES
from sparsec.text import EscapingStream, escaped, format_table, plural

PROG = "sparsec"
COMPARISON_HTML = "sparsec-comparison.html"
SET_HELP = ("override a spec key (repeatable): train.steps=40, export.bench=false, "
            "prune[0].density=0.1, prune.block=[32,32] (every group)")


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
    debug: bool = False
    overrides: list[str] = field(default_factory=list)
    resume: bool = False


def run_compile(opts: CompileOptions, stdout: TextIO | None = None) -> Path | None:
    """`sparsec compile`: load the spec and model.py, run the driver, print what it made.
    Returns OUT (None for a dry run)."""
    from sparsec.spec import load_spec
    from sparsec.training import distributed

    spec = load_spec(opts.spec, opts.overrides)
    # under torchrun: one process group for the whole compile; rank 0 prints and writes OUT
    started_group = distributed.init_from_env(spec.train.device if spec.train else "cpu")
    clean = False
    try:
        main = distributed.is_main()
        out = _compile(opts, spec, (stdout or sys.stdout) if main else io.StringIO(), main)
        clean = True
        return out
    finally:
        if started_group:
            distributed.shutdown(clean)


def _compile(opts: CompileOptions, spec: Any, stdout: TextIO, main: bool) -> Path | None:
    from sparsec import driver, modelfile, outdir
    from sparsec.pipeline import Instruments

    passes = driver.pipeline(spec, opts.stop_after, opts.dry_run)
    print_after = _check_print_after(opts.print_after, driver.pipeline(spec))
    if opts.print_pipeline:
        stdout.write(driver.format_pipeline(passes) + "\n")
    out = Path(opts.out) if opts.out else outdir.default_out(opts.model)
    if not opts.dry_run:  # fail before the expensive part (the driver checks again, under a lock)
        outdir.check_replaceable(out, None if opts.out else opts.model)
    from sparsec.progress import StageLine

    mf = modelfile.load(opts.model)
    instruments = Instruments(print_after=print_after, time_passes=opts.time_passes,
                              explain=opts.debug, stream=stdout, snapshots=[],
                              stages=StageLine(enabled=opts.progress and main))
    job = driver.Job(model=mf.model, spec=spec, example_inputs=mf.example_inputs,
                     example_kwargs=mf.example_kwargs, modelfile=mf, stop_after=opts.stop_after,
                     dry_run=opts.dry_run, out=None if opts.dry_run else out,
                     default_out=not opts.out, instruments=instruments, progress=opts.progress,
                     resume=opts.resume)
    outcome = driver.run(job)
    if not main:   # rank 0 says what was done
        return None
    for warning in outcome.warnings:
        print(f"{PROG}: warning: {printable(warning)}", file=sys.stderr)
    if opts.dry_run:
        stdout.write(format_dry_run(list(outcome.info.sites.values()), outcome.info.left_out) + "\n")
        for group in spec.groups:
            if not any(site.group == group.index for site in outcome.info.sites.values()):
                stdout.write(f"prune[{group.index}].targets {list(group.targets)} select no site: the sites "
                             f"are the weights listed above\n")
        return None
    stdout.write(outcome.report_text + f"\n\nwrote {out}\n")
    return out


def _check_print_after(names: list[str], passes: list) -> frozenset[str]:
    wanted = {name.strip() for item in names for name in item.split(",") if name.strip()}
    known = ["captured", "exported"] + [p.name for p in passes]
    unknown = sorted(wanted - set(known) - {"all"})
    if unknown:
        raise UserError(f"--print-after: unknown pass {', '.join(unknown)} "
                        f"(passes: {', '.join(known)}, or all)")
    return frozenset(wanted)


def format_dry_run(sites: list, left_out: dict[str, str]) -> str:
    rows = [(s.name, "x".join(map(str, s.shape)), "x".join(map(str, s.block)), f"{s.numel:,}",
             str(s.group), str(s.method)) for s in sites]
    total = sum(s.numel for s in sites)
    lines = [f"{plural(len(sites), 'site')}, {total:,} weights",
             *format_table(("site", "shape", "block", "parameters", "group", "method"), rows, {3})]
    lines.append(f"left out ({len(left_out)}):" if left_out else "left out: none")
    lines += [f"  {name}: {why}" for name, why in left_out.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ commands
def cmd_validate(args: argparse.Namespace) -> int:
    from sparsec.spec import format_summary, load_spec

    print(format_summary(load_spec(args.spec, args.set or [])))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    opts = CompileOptions(model=args.model, spec=args.spec, out=args.out, dry_run=args.dry_run,
                          print_after=args.print_after or [], print_pipeline=args.print_pipeline,
                          time_passes=args.time_passes, stop_after=args.stop_after,
                          progress=not args.no_progress, debug=getattr(args, "debug", False),
                          overrides=args.set or [], resume=args.resume)
    run_compile(opts)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`sparsec export OUT`: lower and export again from a written folder's state."""
    from sparsec import driver, modelfile, outdir
    from sparsec.pipeline import Instruments
    from sparsec.spec import load_spec

    out = Path(args.out)
    if outdir.marker(out) is None:
        raise UserError(f"{out}: not a sparsec output folder (no {outdir.MARKER} marker); pass the "
                        f"folder that sparsec compile wrote")
    spec = load_spec(args.spec or out / "spec.resolved.toml")
    model = args.model or outdir.marker(out).get("model")  # type: ignore[union-attr]
    if not model or not Path(model).is_file():
        raise UserError(f"{out}: its model file {model or '(not recorded)'} does not exist; pass --model")
    from sparsec.progress import StageLine

    instruments = Instruments(time_passes=args.time_passes, explain=getattr(args, "debug", False),
                              snapshots=[], stages=StageLine(enabled=not args.no_progress))
    outcome = driver.export_folder(out, modelfile.load(model), spec, instruments)
    from sparsec.report import format_lowering

    print("\n".join(format_lowering(outcome.lowering or {})) + f"\n\nwrote {out / driver.MODEL_FILE}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from sparsec.inspection import OutputFolder, inspect_graph, inspect_text

    if len(args.out) > 1:
        return _inspect_several(args)
    if args.html:
        from sparsec.htmlreport import write_report

        print(f"wrote {write_report(args.out[0], args.output)}")
        return 0
    folder = OutputFolder.open(args.out[0])
    if args.format == "text":
        text = inspect_text(folder, stage=args.stage, diff=args.diff)
    elif args.format == "svg":
        from sparsec.htmlreport.graph import folder_svg

        text = folder_svg(folder)
    else:
        text = inspect_graph(folder, args.format)
    return _emit(text, args.output)


def _emit(text: str, output: str | None) -> int:
    """Write `text` to `output` (saying so), or to stdout without one."""
    if output:
        Path(output).write_text(text)
        print(f"wrote {output}")
    else:
        sys.stdout.write(text)
    return 0


def _inspect_several(args: argparse.Namespace) -> int:
    """`sparsec inspect OUT1 OUT2 ...`: the runs side by side (a table, or --html a page)."""
    from sparsec.htmlreport.compare import compare_text, write_comparison
    from sparsec.htmlreport.run import Run

    if args.format != "text" or args.stage or args.diff:
        raise UserError("--format, --stage and --diff show one folder; several folders are compared "
                        "(a table, or --html a page)")
    if args.html:
        print(f"wrote {write_comparison(args.out, args.output or COMPARISON_HTML)}")
        return 0
    return _emit(compare_text([Run.open(out) for out in args.out]), args.output)


def cmd_bench(args: argparse.Namespace) -> int:
    from sparsec.bench import bench, format_bench

    result = bench(args.model, dense=args.dense, threads=args.threads,
                   repeats=args.repeats, kernel=not args.no_kernel, batch=args.batch)
    print(format_bench(result))
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from sparsec.bench import DEFAULT_REPEATS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and warnings")
    parser = argparse.ArgumentParser(prog=PROG, parents=[common],
                                     description="A compiler for neural-network sparsity.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", parents=[common], help="check a spec and summarize it")
    validate.add_argument("spec", metavar="SPEC")
    validate.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    validate.set_defaults(handler=cmd_validate)

    comp = sub.add_parser("compile", parents=[common], help="capture, rewrite, fine-prune a model")
    comp.add_argument("model", metavar="MODEL.py")
    comp.add_argument("--spec", required=True, metavar="SPEC")
    comp.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    comp.add_argument("-o", "--out", metavar="OUT", help="output folder (default: out/<model file stem>)")
    comp.add_argument("--dry-run", action="store_true", help="list the sites and stop; write nothing")
    comp.add_argument("--print-after", action="append", metavar="PASS|all",
                      help="print the IR after a pass, FX or ONNX (repeatable, or a comma list)")
    comp.add_argument("--print-pipeline", action="store_true", help="print the pass list first")
    comp.add_argument("--time-passes", action="store_true", help="print each pass's time")
    comp.add_argument("--stop-after", choices=STAGES, metavar="STAGE",
                      help=f"stop after a stage ({', '.join(STAGES)}) and write what exists")
    comp.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    comp.add_argument("--resume", action="store_true",
                      help="continue an interrupted fine-pruning run from its newest checkpoint "
                           "(train.checkpoint_every) next to OUT")
    comp.set_defaults(handler=cmd_compile)

    exp = sub.add_parser("export", parents=[common], help="lower and export again from an output folder's state")
    exp.add_argument("out", metavar="OUT")
    exp.add_argument("--spec", metavar="SPEC", help="the spec (default: OUT/spec.resolved.toml)")
    exp.add_argument("--model", metavar="MODEL.py", help="the model file (default: the one OUT was compiled from)")
    exp.add_argument("--time-passes", action="store_true", help="print each pass's time")
    exp.add_argument("--no-progress", action="store_true", help="no stage line on the terminal")
    exp.set_defaults(handler=cmd_export)

    insp = sub.add_parser("inspect", parents=[common],
                          help="show an output folder, its HTML report, or several folders side by side")
    insp.add_argument("out", metavar="OUT", nargs="+", help="an output folder (several: compare them)")
    insp.add_argument("--format", choices=("text", "dot", "graphml", "svg"), default="text",
                      help="text (the IR and densities), or the rewritten graph as dot, graphml or svg")
    insp.add_argument("--html", action="store_true",
                      help=f"write the HTML report (default OUT/report.html; several folders: a "
                           f"comparison, default ./{COMPARISON_HTML})")
    insp.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    insp.add_argument("--diff", action="store_true", help="unified diff of the captured vs final IR")
    insp.add_argument("--stage", metavar="NAME", help="the IR after this pass (or 'captured')")
    insp.set_defaults(handler=cmd_inspect)

    ben = sub.add_parser("bench", parents=[common], help="time a block-sparse ONNX file against its dense export")
    ben.add_argument("model", metavar="MODEL.onnx")
    ben.add_argument("--dense", metavar="DENSE.onnx", help="the dense file (default: MODEL.dense.onnx beside MODEL)")
    ben.add_argument("--threads", type=_positive, metavar="N", help="onnxruntime intra-op threads")
    ben.add_argument("--repeats", type=_positive, default=DEFAULT_REPEATS, metavar="N",
                     help=f"interleaved rounds (default {DEFAULT_REPEATS})")
    ben.add_argument("--batch", type=_positive, metavar="N", help="first input dimension (default: the example inputs')")
    ben.add_argument("--no-kernel", action="store_true", help="do not time sparsec's native kernel")
    ben.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ben.set_defaults(handler=cmd_bench)
    return parser


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def printable(text: str) -> str:
    """One line for the terminal: terminal escape codes (ANSI colours of torch.onnx's messages)
    removed, other control characters escaped, whitespace folded."""
    return " ".join(escaped(_ANSI.sub("", text)).split())


def _error_lines(exc: UserError) -> list[str]:
    lines = ([printable(line) for line in exc.errors] or ["invalid spec"]) if isinstance(exc, SpecError) \
        else [printable(str(exc)) or type(exc).__name__]
    rank = _launched_rank()
    if rank is None:
        return lines
    if isinstance(exc, (SpecError, ModelFileError)):
        # every process of a torchrun launch read the same files and found the same: one says it
        return lines if rank == 0 else []
    return [f"[rank {rank}] {line}" for line in lines]


def _launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started it as one of several, else None."""
    from sparsec.training import distributed

    try:
        return int(os.environ.get("RANK", "0") or 0) if distributed.launched() else None
    except ValueError:   # a malformed WORLD_SIZE or RANK: report the error as for one process
        return None


def _quiet_libraries() -> None:
    """Outside --debug, the libraries' own log lines (torch.export's shape notes, onnxscript's,
    transformers' config warnings) do not reach the user's terminal: sparsec says what matters."""
    for name in ("torch", "onnxscript", "onnx_ir", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if not debug:
        _quiet_libraries()
    with warnings.catch_warnings():
        if not debug:  # torch's deprecation chatter is not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        stdout, sys.stdout = sys.stdout, EscapingStream(sys.stdout)  # type: ignore[assignment]
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
            first = printable((str(exc).strip().splitlines() or [""])[0])[:200]
            print(f"{PROG}: internal error: {type(exc).__name__}: {first} (a bug in sparsec; "
                  f"re-run with --debug for the traceback)", file=sys.stderr)
            return 1
        finally:
            sys.stdout = stdout


if __name__ == "__main__":
    sys.exit(main())
