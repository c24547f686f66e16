"""A tiny classifier for the CLI tests: three linears (two pruned, the head left out by the spec),
a layer norm and a free-standing scale parameter that is not a sparsity site."""
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 8))  # 2-D but not a site: left out
        self.fc1 = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.fc1(x * self.scale))
        x = torch.relu(self.fc2(self.norm(x)))
        return self.head(x)


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [2.0] * 4, [-2.0] * 8])
    return centers[y] + 0.5 * torch.randn(n, 8, generator=g), y


def build_model():
    torch.manual_seed(0)
    return Tiny()


def example_inputs():
    return (torch.randn(4, 8),)


def train_data():
    return torch.utils.data.TensorDataset(*_blobs(128, 1))


def eval_data():
    return torch.utils.data.TensorDataset(*_blobs(64, 2))
