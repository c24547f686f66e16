"""Learning from another model's outputs: distillation from the dense teacher (movement pruning
section 6) and PINS self-regularization from the latest best checkpoint (PINS Eq 13, Algorithm 1).

Both compare output distributions with T^2 * KL(softmax(teacher / T) || softmax(student / T))
(Hinton et al. 2014), averaged over examples (every position of a sequence output counts as one).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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
        from sparsec.train import logits_of

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
