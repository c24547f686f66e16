"""Sizes, token and image batches shared by the zoo's model files (tests/test_real_models.py)."""
import torch

VOCAB, HIDDEN, SEQ = 100, 64, 16


def tokens(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def text_example() -> dict[str, torch.Tensor]:
    """The example inputs of a token model: 2 sequences of SEQ tokens, no padding."""
    ids = tokens(2, SEQ, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def text_batches(labels):
    """Four training batches of 8 sequences, labelled by `labels(ids)`."""
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels(ids)}


class DictSamples(torch.utils.data.Dataset):
    """32 single sequences as dict samples with a label, for the DataLoader to batch (a Dataset
    rather than an iterable of batches)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = tokens(1, SEQ, 100 + i)[0]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] % 3}


def image_example() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def image_batches(classes: int):
    """Four training batches of 8 random 32x32 images with cyclic labels."""
    for i in range(4):
        yield {"pixel_values": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)),
               "labels": torch.arange(8) % classes}
