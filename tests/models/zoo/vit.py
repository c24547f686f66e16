"""ViT image classifier from a small config on 32x32 images."""
import torch

from _zoo import HIDDEN, image_batches, image_example

def build_model():
    from transformers import ViTConfig, ViTForImageClassification
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=3))

example_inputs = image_example

def train_data():
    return image_batches(3)
