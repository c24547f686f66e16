"""DistilBERT for sequence classification from a small config."""
import torch

from _zoo import HIDDEN, VOCAB, text_batches, text_example

def build_model():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4,
        hidden_dim=128, max_position_embeddings=64, num_labels=3))

example_inputs = text_example

def train_data():
    return text_batches(lambda ids: ids[:, 0] % 3)
