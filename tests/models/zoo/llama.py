"""Llama causal LM (grouped-query attention, rotary embeddings) from a small config."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, tokens

def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False))

def example_inputs():
    ids = tokens(2, SEQ, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

def train_data():
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
