"""GPT-2 language model from a small config; the labels are the inputs (next-token loss)."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, tokens

def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        use_cache=False, bos_token_id=0, eos_token_id=0))

def example_inputs():
    ids = tokens(2, SEQ, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

def train_data():
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
