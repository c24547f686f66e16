"""Capture + rewrite + verify time of BERT-base, beyond torch.export's own time.

    .venv/bin/python bench/compile_time.py [--repeats 5]

Target (DESIGN.md): sparsec.compile of BERT-base (movement, global, density 0.1, every encoder
linear) takes at most 3 s more than torch.export.export of the same model and inputs.
Both are timed interleaved; medians are reported.
"""
from __future__ import annotations

import argparse
import gc
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median  # noqa: E402

import sparsec  # noqa: E402
from sparsec.capture import dynamic_shapes  # noqa: E402

SPEC = {
    "prune": [{"targets": ["encoder.layer.*"], "method": "movement", "density": 0.1, "scope": "global"}],
    "schedule": {"kind": "cubic", "total": 20000, "warmup": 2000, "cooldown": 4000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig())  # BERT-base: 12 layers, hidden 768, 72 encoder linears
    ids = torch.randint(0, 30000, (2, 128))

    def export_only() -> None:
        torch.export.export(model, (ids,), dynamic_shapes=dynamic_shapes(model, (ids,), {}), strict=False)
        gc.collect()

    def sparsec_compile() -> None:
        prog = sparsec.compile(model, SPEC, (ids,))
        assert len(prog.sites) == 72
        del prog
        gc.collect()

    times = interleaved({"torch.export": export_only, "sparsec.compile": sparsec_compile},
                        repeats=args.repeats)
    t_export, t_compile = median(times["torch.export"]), median(times["sparsec.compile"])
    print(f"machine: {machine()}")
    print(f"BERT-base, batch 2, seq 128, {args.repeats} interleaved runs, medians")
    print(f"torch.export.export        {t_export:6.2f} s")
    print(f"sparsec.compile            {t_compile:6.2f} s   (capture + 5 passes + verify + Program)")
    print(f"beyond torch.export        {t_compile - t_export:6.2f} s   (target <= 3 s)")


if __name__ == "__main__":
    main()
