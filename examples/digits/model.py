"""A real (small) pre-trained model to fine-prune: an MLP on scikit-learn's handwritten digits.

scikit-learn ships the data (1797 8x8 images, no download). `build_model()` trains the MLP densely
for a few seconds, seeded, so the same dense model comes out every time; sparsec then prunes it
to 10% of its weights with movement pruning and fine-tunes it (see spec.toml).

    sparsec compile examples/digits/model.py --spec examples/digits/spec.toml -o out/digits
"""
from __future__ import annotations

import functools

import torch
from torch.utils.data import TensorDataset

SEED = 0
# A model this small runs fastest on one thread: handing 64k-element ops to a second thread costs
# more than the work, and much more when the machine is busy.
torch.set_num_threads(1)
HIDDEN = 256
DENSE_EPOCHS = 30


class MLP(torch.nn.Module):
    def __init__(self, inputs: int = 64, hidden: int = HIDDEN, classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.fc1 = torch.nn.Linear(inputs, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, classes)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(torch.relu(self.fc1(x)))
        x = self.dropout(torch.relu(self.fc2(x)))
        return self.out(x)


@functools.lru_cache(maxsize=1)
def _split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed 80/20 train/test split of the digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED))
    test = len(x) // 5
    test_idx, train_idx = order[:test], order[test:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def build_model() -> torch.nn.Module:
    """The MLP, trained densely on the training split (a couple of seconds, deterministic)."""
    torch.manual_seed(SEED)
    model = MLP()
    x, y, _, _ = _split()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(DENSE_EPOCHS):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.zeros(8, 64),)


def train_data() -> TensorDataset:
    x, y, _, _ = _split()
    return TensorDataset(x, y)


def eval_data() -> TensorDataset:
    _, _, x, y = _split()
    return TensorDataset(x, y)


# loss(outputs, batch) and metric(outputs, batch) are left to sparsec's defaults:
# cross-entropy and accuracy of the logits against the target.
