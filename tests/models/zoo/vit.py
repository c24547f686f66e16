"""ViT image classifier from a small config on 32x32 images."""
import torch

from _zoo import HIDDEN

def build_model():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3))

def example_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}

def train_data():
    for i in range(4):
        yield {"pixel_values": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)),
               "labels": torch.arange(8) % 3}
