"""BERT for sequence classification from a small config; batches are dicts with labels."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, tokens

def build_model():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, num_labels=3))

def example_inputs():
    ids = tokens(2, SEQ, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

def train_data():
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}

eval_data = train_data
