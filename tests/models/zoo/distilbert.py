"""DistilBERT for sequence classification from a small config."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, tokens

def build_model():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4,
        hidden_dim=128, max_position_embeddings=64, num_labels=3))

def example_inputs():
    ids = tokens(2, SEQ, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

def train_data():
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}
