"""Fine-pruning inside a Hugging Face Trainer: an existing Trainer script prunes with a spec by
changing one class name.

    from sparsec.integrations.hf import SparsecTrainer

    trainer = SparsecTrainer(model, "specs/movement_bert.toml", args=TrainingArguments(...),
                             train_dataset=train, eval_dataset=dev)
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    trainer.finalize_into(model).save_pretrained("pruned")   # a normal HF folder, zeros baked in

What the subclass changes, and why:

* The model the Trainer trains is the sparsec Program compiled from `model` and the spec, captured
  on a batch of the training set (`example_kwargs=` to choose it). A batch's `labels` reach the model
  when they were part of the capture (the default), so `outputs.loss` is the model's own loss.
* The loss is `(1 - alpha) * loss + prog.distillation_loss(...) + prog.regularization()` (alpha of
  the spec's [distill] table; 0 without it), so regularizers (soft movement, L0, DynSparse) and
  distillation work as in `sparsec compile`.
* The optimizer has the Trainer's groups for the weights (decay and no decay) and one group for the
  scores at `score_learning_rate` (the spec's `train.score_lr`, else 1e-2) without weight decay; the
  Trainer's scheduler scales every group the same way.
* `prog.step()` runs after every optimizer step and before the gradients are zeroed (the Trainer's
  `on_optimizer_step` event), after the Fisher estimate of loss-modelling methods when due.
* Checkpoints hold the Program's state (weights, scores, masks, schedule position), so
  `resume_from_checkpoint` continues the pruning schedule; the Trainer restores the optimizer,
  scheduler and random generators itself.
* DDP comes from the Trainer's own launch (`torchrun --nproc_per_node N script.py`): masks are
  computed from identical, all-reduced inputs on every process (scores' and weights' gradients by
  DDP, the loss-modelling estimates by sparsec), and `SPARSEC_CHECK_RANKS=1` (or the spec's
  `[train] check_ranks`) compares them across processes after every mask update. The Trainer's FSDP
  is refused with a clear error: sparsec's FSDP is `[train] parallel = "fsdp"` in `sparsec compile`.
  End such a script with `sparsec.training.distributed.shutdown()` (every process waits for the
  others, then the process group is destroyed). With gloo, torch's teardown at interpreter exit can
  still abort a process now and then ("terminate called without an active exception") after its
  work is done and its files are written; tests/test_hf_trainer.py's script ends with `os._exit(0)`.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from sparsec import estimation
from sparsec.errors import TrainingError
from sparsec.paths import save_tensors
from sparsec.training import distributed
from sparsec.training.losses import objective as objective_of

DEFAULT_SCORE_LR = 1e-2
EXAMPLES = 2  # training examples the Program is captured on


class SparsecTrainer(Trainer):
    """A Trainer that fine-prunes `model` as `spec` says (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, spec: Any, args: Any = None, *,
                 example_kwargs: dict[str, Any] | None = None, score_learning_rate: float | None = None,
                 **kwargs: Any):
        import sparsec
        from sparsec.spec import load_spec

        self.spec = load_spec(spec)
        self.user_model = model
        if example_kwargs is None:
            example_kwargs = example_batch(model, kwargs.get("train_dataset"), kwargs.get("data_collator"))
        self.program = sparsec.compile(model, self.spec, (), example_kwargs)
        self.objective = objective_of(None, model, example_kwargs)
        train = self.spec.train
        self.score_learning_rate = score_learning_rate or (train.score_lr if train else DEFAULT_SCORE_LR)
        super().__init__(model=self.program, args=args, **kwargs)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self.add_callback(ProgramStep(self))

    # --------------------------------------------------------------------------- data and loss
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:  # the Program takes what it was captured with
            self._signature_columns = [*self.program.example_kwargs, "labels", "label", "label_ids",
                                       *self.label_names]

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        prog, objective = self.program, self.objective
        batch = _with_labels(inputs)
        outputs = objective.forward(model, batch, self.state.global_step + 1)
        args, kwargs = objective.inputs(batch)
        loss = (prog.task_loss_weight * objective.loss(outputs, batch)
                + prog.distillation_loss(outputs, *args, **kwargs) + prog.regularization())
        return (loss, outputs) if return_outputs else loss

    # -------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            prog = self.program
            score_ids = {id(p) for p in prog.score_parameters()}
            named = [(n, p) for n, p in prog.named_parameters() if p.requires_grad and id(p) not in score_ids]
            decay = set(self.get_decay_parameter_names(prog))
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            scores = [p for p in prog.score_parameters() if p.requires_grad]
            if scores:
                groups.append({"params": scores, "weight_decay": 0.0, "lr": self.score_learning_rate})
            cls, options = self.get_optimizer_cls_and_kwargs(self.args, prog)
            self.optimizer = cls([g for g in groups if g["params"]], **options)
        self.program.attach_optimizer(self.optimizer)
        return self.optimizer

    # ------------------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Program's whole state (weights, scores, masks, schedule position) as
        model.safetensors, tied weights saved apart (safetensors refuses shared storage)."""
        if not self.args.should_save:
            return
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(state_dict if state_dict is not None else self.program.state_dict(),
                     folder / "model.safetensors")
        torch.save(self.args, folder / "training_args.bin")

    def finalize_into(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The finalized weights (masks baked in) loaded into `model` (default: the model this
        trainer was built with), which is returned: `save_pretrained()` then writes a normal
        Hugging Face folder that `from_pretrained()` reloads."""
        from sparsec.driver import finalized_state

        model = model if model is not None else self.user_model
        self.program.to("cpu")
        model.load_state_dict(finalized_state(self.program, model.to("cpu")), strict=True)
        return model.eval()


class ProgramStep(TrainerCallback):
    """`prog.step()` after each optimizer step, before the gradients are zeroed; before it, the
    Fisher estimate of loss-modelling methods when a pruning iteration is due."""

    def __init__(self, trainer: SparsecTrainer):
        self.trainer = trainer
        self.examples: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(self.trainer, "is_fsdp_enabled", False):
            raise TrainingError("SparsecTrainer does not run under the Trainer's FSDP (its mask updates "
                                "need whole tensors): use DDP, or `sparsec compile` under torchrun with "
                                "[train] parallel = \"fsdp\"")

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer, prog = self.trainer, self.trainer.program
        iteration = estimation.before_pruning(prog, self._examples(), trainer.objective) \
            if prog.estimate_due() else None
        prog.step()
        if iteration is not None:
            iteration.finish(int(prog.step_count), prog)
        if distributed.check_requested(trainer.spec.train) and int(prog.step_count) % prog.schedule.every == 0:
            distributed.check_masks(prog)

    def _examples(self) -> Any:
        """Batches of the training set for the estimates, on the program's device, forever."""
        def forever():
            while True:
                for batch in self.trainer.get_train_dataloader():
                    yield _with_labels(self.trainer._prepare_inputs(batch))
        if self.examples is None:
            self.examples = forever()
        return self.examples


def _with_labels(inputs: dict[str, Any]) -> dict[str, Any]:
    """A Trainer batch in sparsec's data convention: a dict whose `labels` is the target."""
    batch = dict(inputs)
    for name in ("label", "label_ids"):
        if "labels" not in batch and name in batch:
            batch["labels"] = batch.pop(name)
    return batch


def example_batch(model: torch.nn.Module, dataset: Any, collator: Any) -> dict[str, Any]:
    """The first EXAMPLES examples of `dataset`, collated, keeping what `model.forward` accepts
    (labels included): the inputs the Program is captured on."""
    from transformers.data.data_collator import default_data_collator

    if dataset is None or len(dataset) == 0:
        raise ValueError("SparsecTrainer needs a train_dataset (or example_kwargs=) to capture the model on")
    batch = (collator or default_data_collator)([dataset[i] for i in range(min(EXAMPLES, len(dataset)))])
    batch = _with_labels(dict(batch))
    accepted = set(inspect.signature(model.forward).parameters)
    return {k: v for k, v in batch.items() if k in accepted and isinstance(v, torch.Tensor)}
