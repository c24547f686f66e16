"""The data convention of model.py's `train_data()` / `eval_data()`, and running a model on a batch.

* a torch `Dataset` is wrapped in a `DataLoader` (`[train] batch_size`, shuffled for training with a
  generator seeded from `[train] seed`); anything else is taken as an iterable of batches;
* a batch is `(inputs, target)` where `inputs` is a tensor (one positional argument), a tuple or
  list (positional arguments) or a dict (keyword arguments); or a dict with a `labels` key, Hugging
  Face style, whose other keys are the model's keyword arguments.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from sparsec.errors import ModelFileError, TrainingError, UserError
from sparsec.modelfile import ModelFile


@dataclass(frozen=True)
class Batch:
    """One batch split into what the model takes and what the loss compares against."""

    args: tuple
    kwargs: dict
    target: Any


def split_batch(batch: Any) -> Batch:
    """Apply the data convention: `(inputs, target)` or a dict with `labels`."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TrainingError(f"a dict batch needs a 'labels' key (got keys {sorted(batch)}); "
                                f"or yield (inputs, target) pairs")
        kwargs = {k: v for k, v in batch.items() if k != "labels"}
        return Batch((), kwargs, batch["labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, target = batch
        if isinstance(inputs, Mapping):
            return Batch((), dict(inputs), target)
        if isinstance(inputs, (tuple, list)):
            return Batch(tuple(inputs), {}, target)
        return Batch((inputs,), {}, target)
    raise TrainingError(f"a batch must be (inputs, target) or a dict with 'labels', got {describe(batch)}")


def describe(value: Any) -> str:
    """A short description of a batch or an output, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(v) for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__} of {len(value)} ({inner}{more})"
    if isinstance(value, Mapping):
        return "dict {" + ", ".join(f"{k}: {describe(v)}" for k, v in list(value.items())[:6]) + "}"
    return type(value).__name__


def batches(data: Any, batch_size: int, seed: int, shuffle: bool, what: str, rank: int = 0,
            world: int = 1) -> Iterable:
    """A re-iterable source of batches for `data` as model.py returned it: this process's share
    of them when there are `world` processes (a DistributedSampler for a shuffled Dataset, else
    every `world`-th batch starting at `rank`)."""
    # Every DataLoader gets its own generator: iterating one then never draws from the global
    # generator (which the model's dropout uses), whatever the process layout.
    generator = torch.Generator().manual_seed(seed)
    if isinstance(data, IterableDataset):
        return _Shard(DataLoader(data, batch_size=batch_size, generator=generator), rank, world)
    if isinstance(data, Dataset):
        if world > 1 and shuffle:
            sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
            return DataLoader(data, batch_size=batch_size, sampler=sampler, generator=generator)
        return _Shard(DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator), rank, world)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, torch.Tensor)):
        return _Shard(data, rank, world)
    raise ModelFileError(f"{what} must return a torch Dataset or an iterable of batches, "
                         f"got {type(data).__name__}")


class _Shard:
    """Every `world`-th item of `source` from `rank` (all of it for one process)."""

    def __init__(self, source: Iterable, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world
        # a generator: ask model.py again for the next epoch (a DataLoader is re-iterable, and
        # iter() on one would draw from its generator)
        self.one_shot = not isinstance(source, DataLoader) and iter(source) is source

    def __iter__(self) -> Iterator[Any]:
        if self.world == 1:
            return iter(self.source)
        return itertools.islice(iter(self.source), self.rank, None, self.world)


class Stream:
    """The batches of model.py's `name()` forever, for this process: one-shot iterables
    (generators) are asked for again each epoch. `position` counts the batches given, the data
    position of a checkpoint; `skip(n)` fast-forwards a fresh stream to it (by drawing the batches,
    so a resumed run sees exactly the batches an uninterrupted one would)."""

    def __init__(self, modelfile: ModelFile, name: str, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1):
        self.modelfile, self.name = modelfile, name
        self.args = (batch_size, seed, True, f"{name}()", rank, world)
        self.position = 0
        self.epoch = 0
        self._batches = self._forever()
        self._peeked: list[Any] = []

    def _source(self) -> Iterable:
        return batches(self.modelfile.call(self.name), *self.args)

    def _forever(self) -> Iterator[Any]:
        source = self._source()
        while True:
            sampler = getattr(source, "sampler", None)
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(self.epoch)
            count = 0
            for batch in source:
                count += 1
                yield batch
            if count == 0:
                raise TrainingError(f"{self.modelfile.path}: {self.name}() gave no batches"
                                    + (" for this process" if self.args[-1] > 1 else ""))
            self.epoch += 1
            if getattr(source, "one_shot", False):
                source = self._source()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        batch = self._peeked.pop() if self._peeked else next(self._batches)
        self.position += 1
        return batch

    def peek(self) -> Any:
        """The next batch, left in the stream."""
        if not self._peeked:
            self._peeked.append(next(self._batches))
        return self._peeked[0]

    def skip(self, count: int) -> None:
        for _ in range(count):
            next(self)


def batch_size_of(batch: Any) -> int:
    """Examples in a batch: the first dimension of its target (1 for a scalar target)."""
    target = split_batch(batch).target
    if isinstance(target, torch.Tensor) and target.dim() > 0:
        return int(target.shape[0])
    return 1


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Examples [start, stop) of a batch of `size` examples, in the batch's own structure (every
    tensor whose first dimension is `size` is sliced; anything else is kept)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: slice_batch(v, start, stop, size) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, start, stop, size) for v in batch)
    return batch


def forward(model: torch.nn.Module, batch: Any, step: int | None, shown: Any = None) -> Any:
    """Run the model on a batch, reporting the user's shape mistakes as user errors (`shown`: the
    batch to name in them, when `batch` was rebuilt)."""
    parts = split_batch(batch) if shown is None else Batch((), dict(batch), None)
    batch = batch if shown is None else shown
    try:
        return model(*parts.args, **parts.kwargs)
    except UserError:
        raise
    except Exception as exc:
        when = f"at training step {step}" if step is not None else "during evaluation"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        hint = _keys_hint(model, parts) or ("check the data convention: (inputs, target) or a dict "
                                            "with 'labels'")
        raise TrainingError(f"the model raised {type(exc).__name__} {when} on a batch of "
                            f"{describe(batch)}: {first} ({hint})") from exc


def _keys_hint(model: torch.nn.Module, parts: Batch) -> str:
    """When the batch's keyword inputs are not the ones the Program was captured with, which
    differ and what to do; '' when they are the same (or the model is not a Program)."""
    captured = getattr(model, "example_kwargs", None)
    if not isinstance(captured, dict) or (not captured and not parts.kwargs):
        return ""
    extra, missing = sorted(set(parts.kwargs) - set(captured)), sorted(set(captured) - set(parts.kwargs))
    if not extra and not missing:
        return ""
    said = [f"the graph was captured with the keyword inputs {', '.join(sorted(captured)) or 'none'}"]
    if extra:
        said.append(f"the batch also gives {', '.join(extra)}: add them to example_inputs() / "
                    f"example_kwargs() to capture them, or leave them out of the batches")
    if missing:
        said.append(f"the batch lacks {', '.join(missing)}: every batch must give them")
    return "; ".join(said)
