"""ResNet (basic blocks) image classifier from a small config: its conv sites are pruned and, with policy = always, lowered to BlockSparseConv nodes (BatchNormalization, the residual Add and Relu folded in)."""
import torch

from _zoo import image_batches, image_example

def build_model():
    from transformers import ResNetConfig, ResNetForImageClassification
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[32, 64],
        depths=[1, 1], layer_type="basic", num_labels=3))

example_inputs = image_example

def train_data():
    return image_batches(3)
