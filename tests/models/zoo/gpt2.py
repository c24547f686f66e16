"""GPT-2 language model from a small config; the labels are the inputs (next-token loss)."""
import torch

from _zoo import HIDDEN, VOCAB, text_batches, text_example

def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        use_cache=False, bos_token_id=0, eos_token_id=0))

example_inputs = text_example

def train_data():
    return text_batches(lambda ids: ids)
