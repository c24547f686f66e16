"""Compiles fine, then train_data() raises: the compile fails after the expensive part."""
from tiny_mlp import build_model, example_inputs  # noqa: F401  (model.py's folder is importable)


def train_data():
    raise ValueError("the training shards are missing")
