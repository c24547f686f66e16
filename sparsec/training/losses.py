"""What fine-pruning minimises and measures: an `Objective` (loss, metric, how a batch reaches the
model, and a sentence saying which loss it is, for the report). In order of precedence:

1. model.py's `loss(outputs, batch)` and `metric(outputs, batch)`;
2. the model's own loss (`outputs.loss`, Hugging Face style) when it was captured with `labels`
   among its example inputs: the batch's labels are passed to the model;
3. for a causal language model (a transformers *ForCausalLM / *LMHeadModel class), cross-entropy
   and accuracy of the next token: the logits at position t against the label at t + 1;
4. cross-entropy and accuracy of the logits (the output tensor, else `outputs.logits`, else
   `outputs[0]`) against the target.
Targets equal to -100 are ignored, as Hugging Face does.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparsec.errors import TrainingError
from sparsec.modelfile import ModelFile
from sparsec.training.data import describe, forward, split_batch

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
    """Logits [N, C] and class indices [N], checked: a target outside 0..C-1 (other than the
    ignored -100) is the user's mistake, named as such rather than a crash inside cross_entropy."""
    if not isinstance(target, torch.Tensor):
        raise TrainingError(f"the default loss needs a tensor target, got {describe(target)}: "
                            f"define loss(outputs, batch) in model.py")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TrainingError(f"the default loss needs class indices as targets, got {target.dtype} "
                            f"values: define loss(outputs, batch) in model.py for other targets")
    classes = logits.shape[-1]
    flat = target.reshape(-1).long()
    if logits.numel() // max(classes, 1) != flat.numel():
        raise TrainingError(f"the logits {list(logits.shape)} and the targets {list(target.shape)} do "
                            f"not pair up (one target per row of {classes} logits): define loss(outputs, "
                            f"batch) in model.py")
    bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= classes))
    if bool(bad.any()):
        raise TrainingError(f"a target is {int(flat[bad][0])}, outside the {classes} classes of the "
                            f"logits (0..{classes - 1}, or {IGNORE_INDEX} to ignore a position)")
    return logits.reshape(-1, classes), flat


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


def default_rows(outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [N, C] and targets [N] of the default cross-entropy (for the Gauss-Newton
    curvature of loss-modelling methods, sparsec.curvature)."""
    return _flat(logits_of(outputs), split_batch(batch).target)


def causal_rows(outputs: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits [N, C] and targets [N] of the next-token cross-entropy."""
    logits, labels = logits_of(outputs), split_batch(batch).target
    return _flat(logits[..., :-1, :], labels[..., 1:] if isinstance(labels, torch.Tensor) else labels)


def causal_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy of the next token: logits at position t against the label at t + 1."""
    logits, labels = logits_of(outputs), split_batch(batch).target
    logits, target = _flat(logits[..., :-1, :], labels[..., 1:] if isinstance(labels, torch.Tensor) else labels)
    return torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def causal_metric(outputs: Any, batch: Any) -> float:
    """Accuracy of the next token."""
    logits, labels = logits_of(outputs), split_batch(batch).target
    logits, target = _flat(logits[..., :-1, :], labels[..., 1:] if isinstance(labels, torch.Tensor) else labels)
    keep = target != IGNORE_INDEX
    total = int(keep.sum())
    return float((logits.argmax(-1)[keep] == target[keep]).sum()) / total if total else 0.0


def own_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """The loss the model computed itself from the labels it was given (`outputs.loss`)."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None:
        raise TrainingError(f"the model was captured with labels but returns no loss "
                            f"({describe(outputs)}): define loss(outputs, batch) in model.py")
    return loss


@dataclass(frozen=True)
class Objective:
    """The loss and metric of fine-pruning, and how a batch reaches the model."""

    loss: Callable[[Any, Any], Any]
    metric: Callable[[Any, Any], Any]
    description: str
    labels_to_model: bool = False   # pass the batch's labels to the model (it computes its loss)
    # the logits [N, C] and class targets [N] when the loss is a softmax cross-entropy of them
    # (the Gauss-Newton curvature of lm / qm / obd needs them); None for model.py's own loss
    rows: Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, model: torch.nn.Module, batch: Any, step: int | None) -> Any:
        if not self.labels_to_model:
            return forward(model, batch, step)
        parts = split_batch(batch)
        return forward(model, {**parts.kwargs, "labels": parts.target}, step, batch)

    def inputs(self, batch: Any) -> tuple[tuple, dict]:
        """The positional and keyword arguments the model gets for `batch` (the labels too when
        it computes its own loss): what a teacher or a checkpoint must be called with."""
        parts = split_batch(batch)
        if self.labels_to_model:
            return (), {**parts.kwargs, "labels": parts.target}
        return parts.args, parts.kwargs


def is_causal_lm(model: torch.nn.Module | None) -> bool:
    """A transformers causal language model (its class among AutoModelForCausalLM's)."""
    if model is None:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def objective(modelfile: ModelFile | None, model: torch.nn.Module | None = None,
              example_kwargs: Mapping[str, Any] | None = None) -> Objective:
    """The objective for a model file and its model (see the module docstring)."""
    if modelfile is not None and modelfile.has("loss"):
        metric = metric_fn(modelfile)
        return Objective(lambda outputs, batch: modelfile.call("loss", outputs, batch), metric,
                         f"loss(outputs, batch) of {modelfile.path}")
    metric = metric_fn(modelfile) if modelfile is not None else default_metric
    if example_kwargs and "labels" in example_kwargs:
        return Objective(own_loss, metric, "the model's own loss (outputs.loss): it was captured "
                         "with labels, and each batch's labels are passed to it", labels_to_model=True,
                         rows=causal_rows if is_causal_lm(model) else default_rows)
    if is_causal_lm(model):
        name = type(model).__name__
        own_metric = modelfile is not None and modelfile.has("metric")
        return Objective(causal_loss, metric if own_metric else causal_metric,
                         f"cross-entropy of the next token (labels shifted by one: {name} is a "
                         f"causal language model)", rows=causal_rows)
    return Objective(default_loss, metric, "cross-entropy of the logits against the target",
                     rows=default_rows)


def metric_fn(modelfile: ModelFile) -> Callable[[Any, Any], Any]:
    if modelfile.has("metric"):
        return lambda outputs, batch: modelfile.call("metric", outputs, batch)
    return default_metric


def as_metric(value: Any, where: str) -> float:
    """What metric() returned, as a float: a number or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainingError(f"{where} must return a number (higher is better), got {describe(value)}")
    return float(value)


def as_loss(value: Any, step: int, origin: str = "the loss") -> torch.Tensor:
    """Check what the loss returned (`origin` names it): a finite scalar tensor that depends on
    the parameters."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise TrainingError(f"{origin} must return a scalar tensor, got {describe(value)}")
    if not torch.isfinite(value):
        raise TrainingError(f"the loss ({origin}) is {float(value.detach())} at training step {step}: lower "
                            f"[train] lr or set [train] max_grad_norm")
    if not value.requires_grad:
        raise TrainingError(f"the loss ({origin}) does not depend on the model's parameters (no gradient)")
    return value
