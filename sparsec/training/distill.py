"""Learning from another model's outputs: distillation from the dense teacher (movement pruning
section 6) and PINS self-regularization from the latest best checkpoint (PINS Eq 13, Algorithm 1).

Both compare output distributions with T^2 * KL(softmax(teacher / T) || softmax(student / T))
(Hinton et al. 2014), averaged over examples (every position of a sequence output counts as one).
The spec's [distill] and [self_regularization] tables are declared here.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from sparsec.schema import Field
from sparsec.spec.registry import Problem, register_check, register_table
from sparsec.training.losses import logits_of

DISTILL_FIELDS = {
    "alpha": Field("float", "Weight of the distillation term: the loss is (1 - alpha) * task loss + "
                   "alpha * T^2 * KL(teacher || student) (movement pruning section 6, 'a linear "
                   "combination of the training loss and a knowledge distillation loss').",
                   default=0.9, ge=0, le=1),
    "temperature": Field("float", "Softmax temperature T of teacher and student (Hinton et al. "
                         "2014).", default=2.0, gt=0),
    "teacher": Field("str", "`dense`: the model as it was before rewriting (a frozen copy taken at "
                     "compile time). `model`: the module model.py's `teacher()` returns. Any other "
                     "value: a folder (relative to the spec file) holding `model.safetensors`, whose "
                     "tensors are loaded into model.py's `teacher()`, else a fresh `build_model()`: "
                     "a separately fine-tuned teacher, as in movement pruning Table 3. Only tensors "
                     "are read from the folder, never code. The teacher runs frozen, in eval mode, "
                     "on the Program's device (sparsec.training.teacher).", default="dense"),
}

SELF_REGULARIZATION_FIELDS = {
    "lambda": Field("float", "Weight of the self-regularization term lambda * KL(checkpoint || "
                    "model) added to the loss (PINS Eq 13 adds it with weight 1).", default=1.0, ge=0),
    "temperature": Field("float", "Softmax temperature of the KL term.", default=1.0, gt=0),
}

register_table("distill", DISTILL_FIELDS,
               doc="Distillation from the dense model (movement pruning section 6). The fine-pruning "
                   "loop trains on `(1 - alpha) * loss + prog.distillation_loss(outputs, *inputs)`; "
                   "API users do the same (`prog.task_loss_weight` is 1 - alpha). Optional.")
register_table("self_regularization", SELF_REGULARIZATION_FIELDS,
               doc="PINS self-regularization (Eq 13, Algorithm 1): the fine-pruning loop adds "
                   "lambda * KL between the outputs of the latest best checkpoint and the current "
                   "model; the checkpoint starts as the model before pruning and is refreshed "
                   "whenever the metric on `eval_data()` improves (every `train.eval_every` steps). "
                   "Costs a second forward pass per step and a copy of the model "
                   "(docs/BENCHMARKS.md). API users: `sparsec.training.distill.SelfRegularizer`. Optional.")


@register_check("`[self_regularization]` with a `[train]` table needs `train.eval_every >= 1`: the "
                "checkpoint is refreshed when the evaluation metric improves.")
def _check_self_regularization(resolved: Mapping[str, Any]) -> list[Problem]:
    train = resolved.get("train")
    if resolved.get("self_regularization") is None or train is None or train.get("eval_every") != 0:
        return []
    return [("train.eval_every", "0 never evaluates, so [self_regularization] would never refresh its "
                                 "checkpoint (allowed: an integer, 1 <= x)")]


@register_check("`distill.teacher` is `dense`, `model` or a folder path (not empty).")
def _check_teacher(resolved: Mapping[str, Any]) -> list[Problem]:
    teacher = (resolved.get("distill") or {}).get("teacher")
    if not isinstance(teacher, str) or teacher.strip():
        return []
    return [("distill.teacher", "'' names no teacher (allowed: 'dense', 'model', or a folder holding "
                                "model.safetensors)")]


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student) with p = softmax(logits / T) over the last dimension,
    averaged over all other positions (Hinton et al. 2014; the distillation loss of movement
    pruning section 6 and the divergence D of PINS Eq 13 with T = 1)."""
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature ** 2


class SelfRegularizer:
    """PINS self-regularization (Ren & Zhu 2023, section 3.2, Eq 13, Algorithm 1).

    The loss gains lambda * D(y_theta(t), y_theta(t_l)), the KL divergence between the outputs of
    the latest best-performing checkpoint theta(t_l) and those of the current model. The checkpoint
    starts as the model before fine-pruning (theta(0), t_l = 0) and is replaced by a copy of the
    current (masked) model whenever the evaluation metric improves (Algorithm 1, lines 8-9); the
    copy is frozen, in eval mode, with its masks baked in.

    Use: `sr = SelfRegularizer(prog, lam)`; in the loop `loss = task + sr.loss(out, *args, **kwargs)`;
    after each evaluation `sr.update(prog, metric)`.
    """

    def __init__(self, prog: Any, lam: float = 1.0, temperature: float = 1.0):
        self.lam = float(lam)
        self.temperature = float(temperature)
        self.best = float("-inf")
        self.refreshes = 0
        self.checkpoint = self._snapshot(prog)

    @staticmethod
    def _snapshot(prog: Any) -> torch.nn.Module:
        module = prog.finalize()
        for param in module.parameters():
            param.requires_grad_(False)
        return module.eval()

    def loss(self, outputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """lambda * KL(checkpoint || current) on the logits of `outputs` (the current model's
        outputs on `*args, **kwargs`)."""
        with torch.no_grad():
            reference = self.checkpoint(*args, **kwargs)
        return self.lam * distillation_kl(logits_of(outputs), logits_of(reference), self.temperature)

    def update(self, prog: Any, metric: float | None) -> bool:
        """Refresh the checkpoint when `metric` beats the best so far (higher is better)."""
        if metric is None or metric <= self.best:
            return False
        self.best = metric
        self.checkpoint = self._snapshot(prog)
        self.refreshes += 1
        return True
