"""BERT for sequence classification from a small config; batches are dicts with labels."""
import torch

from _zoo import HIDDEN, VOCAB, text_batches, text_example

def build_model():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, num_labels=3))

example_inputs = text_example

def train_data():
    return text_batches(lambda ids: ids[:, 0] % 3)

eval_data = train_data
