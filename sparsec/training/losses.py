"""The loss and metric of fine-pruning: model.py's `loss(outputs, batch)` and
`metric(outputs, batch)`, or the defaults, cross-entropy and accuracy of the logits (the output
tensor, else `outputs.logits`, else `outputs[0]`) against the target. Targets equal to -100 are
ignored, as Hugging Face does."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

from sparsec.errors import TrainingError
from sparsec.modelfile import ModelFile
from sparsec.training.data import describe, split_batch

IGNORE_INDEX = -100  # label value that the default loss and metric skip (as Hugging Face does)


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits in a model's outputs: the tensor itself, `.logits`, `["logits"]` or `[0]`."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if getattr(outputs, "logits", None) is not None:
        return outputs.logits
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TrainingError(f"cannot find logits in the model's outputs ({describe(outputs)}): "
                        f"define loss(outputs, batch) and metric(outputs, batch) in model.py")


def _flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(target, torch.Tensor):
        raise TrainingError(f"the default loss needs a tensor target, got {describe(target)}: "
                            f"define loss(outputs, batch) in model.py")
    return logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long()


def default_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy of the logits against the target."""
    logits, target = _flat(logits_of(outputs), split_batch(batch).target)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def default_metric(outputs: Any, batch: Any) -> float:
    """Accuracy of the logits' argmax against the target."""
    logits, target = _flat(logits_of(outputs), split_batch(batch).target)
    keep = target != IGNORE_INDEX
    total = int(keep.sum())
    return float((logits.argmax(-1)[keep] == target[keep]).sum()) / total if total else 0.0


def loss_fn(modelfile: ModelFile) -> Callable[[Any, Any], Any]:
    if modelfile.has("loss"):
        return lambda outputs, batch: modelfile.call("loss", outputs, batch)
    return default_loss


def metric_fn(modelfile: ModelFile) -> Callable[[Any, Any], Any]:
    if modelfile.has("metric"):
        return lambda outputs, batch: modelfile.call("metric", outputs, batch)
    return default_metric


def as_loss(value: Any, step: int) -> torch.Tensor:
    """Check what loss() returned: a finite scalar tensor that depends on the parameters."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TrainingError(f"loss(outputs, batch) must return a scalar tensor, got {describe(value)}")
    if not torch.isfinite(value):
        raise TrainingError(f"the loss is {float(value)} at training step {step}: lower [train] lr "
                            f"or set [train] max_grad_norm")
    if not value.requires_grad:
        raise TrainingError("the loss does not depend on the model's parameters (no gradient)")
    return value
