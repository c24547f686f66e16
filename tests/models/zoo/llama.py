"""Llama causal LM (grouped-query attention, rotary embeddings) from a small config."""
import torch

from _zoo import HIDDEN, VOCAB, text_batches, text_example

def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False))

example_inputs = text_example

def train_data():
    return text_batches(lambda ids: ids)
