"""Broken on purpose: importing it raises."""
raise RuntimeError("the checkpoint folder /nowhere/ckpt is not mounted")
