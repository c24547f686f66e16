"""BERT from a small config with a torch Dataset of dict samples (the DataLoader batches them)."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, text_example, tokens

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 32
    def __getitem__(self, i):
        ids = tokens(1, SEQ, 100 + i)[0]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] % 3}

def build_model():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, num_labels=3))

example_inputs = text_example

def train_data():
    return Data()

eval_data = train_data
