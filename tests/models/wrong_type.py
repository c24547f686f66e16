"""Broken on purpose: build_model() returns a dict of weights, not a module."""
import torch


def build_model():
    return {"fc.weight": torch.zeros(4, 4)}


def example_inputs():
    return (torch.randn(2, 4),)
