"""Broken on purpose: no build_model()."""
import torch


def example_inputs():
    return (torch.randn(2, 8),)
