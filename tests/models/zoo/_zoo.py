"""Sizes and token batches shared by the zoo's model files (tests/test_real_models.py)."""
import torch

VOCAB, HIDDEN, SEQ = 100, 64, 16


def tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
