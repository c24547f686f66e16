"""Fine-pruning: the loop `sparsec compile` runs, and what it is made of.

    loop.py      fine_prune (the Program's contract, the same on every backend), evaluate
    backend.py   the trainer seam: device placement, precision, process group, optimizer step
    data.py      the data convention of model.py's train_data() / eval_data()
    losses.py    the loss and metric (model.py's, or cross-entropy and accuracy of the logits)
    distill.py   distillation and PINS self-regularization, and their spec tables
"""
