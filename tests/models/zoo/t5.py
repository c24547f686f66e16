"""T5 encoder-decoder from a small config; decoder inputs are the shifted targets."""
import torch

from _zoo import HIDDEN, SEQ, VOCAB, tokens

def build_model():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=16, d_ff=128, num_layers=2,
        num_decoder_layers=2, num_heads=4, use_cache=False, decoder_start_token_id=0, pad_token_id=0))

def example_inputs():
    ids = tokens(2, SEQ, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": tokens(2, 8, 2)}

def train_data():
    for i in range(4):
        ids = tokens(8, SEQ, 10 + i)
        tgt = tokens(8, 8, 20 + i)
        dec = torch.cat([torch.zeros(8, 1, dtype=torch.long), tgt[:, :-1]], 1)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": dec, "labels": tgt}
