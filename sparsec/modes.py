"""Modules that restore train/eval behaviour in a captured graph.

torch.export bakes the mode into the graph (dropout's `train` flag, batch norm's `training`,
attention's `dropout_p`). `ModeSwitch` wraps such an op and passes the train-time value of that
one argument when the module is training and the eval-time value otherwise.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class ModeSwitch(torch.nn.Module):
    """Calls `op(**kwargs, key=train_value if self.training else eval_value)`."""

    def __init__(self, op: Callable[..., Any], key: str, train_value: Any, eval_value: Any):
        super().__init__()
        self.op = op
        self.key = key
        self.train_value = train_value
        self.eval_value = eval_value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs[self.key] = self.train_value if self.training else self.eval_value
        return self.op(*args, **kwargs)

    def extra_repr(self) -> str:
        name = getattr(self.op, "__name__", str(self.op))
        return f"{name}, {self.key}: train={self.train_value!r} eval={self.eval_value!r}"
