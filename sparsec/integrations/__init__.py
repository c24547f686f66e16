"""sparsec inside other training engines.

    hf.py    SparsecTrainer: a Hugging Face Trainer that fine-prunes with a spec
"""
