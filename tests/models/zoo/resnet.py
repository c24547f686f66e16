"""ResNet (basic blocks) image classifier from a small config: its conv sites are pruned and, with policy = always, lowered through im2col."""
import torch

def build_model():
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64],
        depths=[1, 1], layer_type="basic", num_labels=3))

def example_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}

def train_data():
    for i in range(4):
        yield {"pixel_values": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)),
               "labels": torch.arange(8) % 3}
