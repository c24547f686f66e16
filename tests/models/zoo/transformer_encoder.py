"""torch.nn.TransformerEncoder over embeddings with a linear head; (ids, label) tuples."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, tokens

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        layer = torch.nn.TransformerEncoderLayer(HIDDEN, 4, 128, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(HIDDEN, 5)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(dim=1))

def build_model():
    torch.manual_seed(0)
    return Net()

def example_inputs():
    return tokens(2, SEQ, 1)

def train_data():
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        yield ids, ids[:, 0] % 5
