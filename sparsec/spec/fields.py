"""The keys of the core tables ([[prune]], [schedule], [train], [capture]): the single place where
each key's type, default, bounds and documentation are written. `sparsec.spec.model` takes its
defaults from here, validation checks against them and docs/spec.md is rendered from them."""
from __future__ import annotations

from sparsec import methods, schedules
from sparsec.schema import Field
from sparsec.spec.registry import Derived


def prune_fields() -> dict[str, Field]:
    return {
        "targets": Field("list[str]", "Sites this group prunes: fnmatch globs (`*`, `?`, `[seq]`) "
                         "matched against the whole site name, which is the weight's name in "
                         "`model.named_parameters()` (e.g. `encoder.layer.0.attention.self.query.weight`). "
                         "A site is a weight consumed by a linear, convolution or matmul. At least one "
                         "glob."),
        "exclude": Field("list[str]", "Globs of sites to leave dense even though `targets` matches "
                         "them (e.g. `[\"*embed*\", \"*classifier*\"]`).", default=[]),
        "method": Field("str", "The pruning criterion that ranks weights (or blocks); see "
                        "[Methods](#methods) for each method's paper and its own keys.",
                        choices=tuple(methods.names())),
        "density": Field("float", "Final fraction of weights kept, reached at the end of the schedule: "
                         "0.1 keeps 10% (90% sparsity, the movement-pruning paper's headline setting); "
                         "1 prunes nothing.", gt=0, le=1),
        "scope": Field("str", "Where the Top-v selection ranks: `local` keeps `density` of every "
                       "weight matrix separately; `global` ranks all of the group's sites together, so "
                       "layers end at different densities (movement pruning section 6, Figure 5 and 6: "
                       "similar results, global ahead only at very high sparsity).",
                       default="local", choices=("local", "global")),
        "block": Field("pair[int]", "Block shape `[rows, cols]` of the weight's matrix view (out x in "
                       "for a linear); whole blocks are kept or pruned. `[1, 1]` is unstructured; "
                       "`[32, 32]` is where the block-sparse kernel runs fastest; `[16, 1]`, `[1, 16]` "
                       "and `[1, 1]` also run on it (about 5x, 3x and 3x one layer at density 0.1). "
                       "When the block does "
                       "not divide the matrix, the last partial blocks are padded. At most 1024 "
                       "per side.", default=[1, 1], le=1024),
        "balanced": Field("bool", "Keep the same number of blocks in every block row of each weight "
                          "matrix: each row keeps its round(density x block columns) best blocks (at "
                          "least one), so the density reached is that count / block columns, exactly "
                          "`density` when it is a multiple of 1 / block columns (the report shows it "
                          "per layer). The kernel's threads and the stock function body (which "
                          "computes the longest block row's length in every row) run balanced masks "
                          "faster. Needs `scope = \"local\"` and a method that selects by Top-v.",
                          default=False),
    }



def schedule_fields() -> dict[str, Field]:
    return {
        "kind": Field("str", "Schedule of the density over optimizer steps; see "
                      "[Schedule kinds](#schedule-kinds).", default="constant",
                      choices=tuple(schedules.names())),
        "total": Field("int", "Optimizer steps T covered by the schedule (warm-up, pruning and "
                       "cool-down). 0 means no step-dependent schedule.", default=0, ge=0),
        "warmup": Field("int", "Steps t_i at `initial_density` before pruning starts (movement "
                        "pruning Eq 5).", default=0, ge=0),
        "cooldown": Field("int", "Steps t_f at the final density at the end of the schedule; a few "
                          "cool-down steps help at high sparsity (movement pruning section 5, Eq 5).",
                          default=0, ge=0),
        "every": Field("int", "Recompute the masks every `every` optimizer steps (Delta t of movement "
                       "pruning Eq 5); masks are never recomputed inside a forward pass.",
                       default=1, ge=1),
        "iterations": Field("int", "Number of pruning iterations pi for iterative schedules (loss "
                            "modelling, Algorithm 1: linear or exponential steps).", default=1, ge=1),
        "at_once": Field("bool", "`linear` / `exponential` only: perform all `iterations` pruning "
                         "iterations one after another inside the single optimizer step `warmup`, "
                         "without training in between, as loss modelling's Algorithm 1 does: "
                         "`lm` / `qm` / `obd` re-estimate g and G before each iteration, then the "
                         "remaining steps fine-tune. The report gives Delta-L of each iteration and "
                         "of the whole prune (Table 1: measured before any fine-tuning). Other "
                         "methods prune to the final density at that step. `false`: one iteration "
                         "per step of the schedule, with training in between.", default=False),
        "initial_density": Field("float", "Density v_i at the start of the schedule; 1 is dense (the "
                                 "papers start from the pre-trained dense model).", default=1.0,
                                 gt=0, le=1),
    }


TRAIN_FIELDS = {
    "steps": Field("int", "Optimizer steps of fine-pruning; one step is one `optimizer.step()` "
                   "followed by one `prog.step()`. Defaults to `schedule.total`; must be at least "
                   "`schedule.total - schedule.cooldown` so the schedule reaches its final density.",
                   default=Derived("schedule.total"), ge=1),
    "batch_size": Field("int", "Examples per forward pass of one process. An optimizer step sees "
                        "`batch_size * accumulate * processes` examples.", default=32, ge=1),
    "accumulate": Field("int", "Micro-batches whose gradients are accumulated into one optimizer "
                        "step. `steps`, the schedule, the learning-rate schedule and `prog.step()` "
                        "all count optimizer steps, not micro-batches.", default=1, ge=1),
    "lr": Field("float", "Learning rate of the model's weights (alpha_W). BERT fine-pruning uses "
                "about 3e-5.", default=1e-3, gt=0),
    "score_lr": Field("float", "Learning rate of learned importance scores (alpha_S of movement "
                      "pruning Eq 4) for methods that learn scores; scores need a far larger rate than "
                      "the weights (1e-2 in the movement-pruning setup).", default=1e-2, gt=0),
    "lr_schedule": Field("str", "Learning-rate schedule of the weights: `constant`, or `linear` / "
                         "`cosine` decay to 0 at `steps` (torch's LambdaLR); each after `warmup_steps` "
                         "of linear warm-up from 0. `linear` with a warm-up is the BERT fine-pruning "
                         "recipe of the movement-pruning paper (Appendix A).", default="constant",
                         choices=("constant", "linear", "cosine")),
    "warmup_steps": Field("int", "Optimizer steps of linear learning-rate warm-up (from 0 to `lr`).",
                          default=0, ge=0),
    "score_lr_schedule": Field("str", "Learning-rate schedule of the scores (see `lr_schedule`).",
                               default=Derived("train.lr_schedule"),
                               choices=("constant", "linear", "cosine")),
    "score_warmup_steps": Field("int", "Warm-up steps of the scores' learning rate.",
                                default=Derived("train.warmup_steps"), ge=0),
    "freeze": Field("list[str]", "Globs of parameter names that do not train (movement pruning "
                    "freezes the embeddings, section 5: `[\"*embeddings*\"]`). Each glob must match "
                    "a parameter; a frozen site is still pruned by its method.", default=[]),
    "optimizer": Field("str", "`adamw` (Adam with decoupled weight decay), `adam` (weight decay "
                       "added to the gradient) or `sgd` (with `momentum`). Adam runs torch's fused implementation "
                       "on CPU and CUDA.", default="adamw",
                       choices=("adamw", "adam", "sgd")),
    "weight_decay": Field("float", "Weight decay coefficient of the optimizer.", default=0.0, ge=0),
    "momentum": Field("float", "Momentum of `sgd`; ignored by adam and adamw.", default=0.0, ge=0, lt=1),
    "seed": Field("int", "Seed of every random number generator the loop uses, for reproducible "
                  "runs and exact resume.", default=0, ge=0),
    "log_every": Field("int", "Log loss, density and learning rates every n steps.", default=10, ge=1),
    "eval_every": Field("int", "Evaluate on the model file's `eval_data()` every n steps; 0 "
                        "evaluates only at the end.", default=0, ge=0),
    "max_grad_norm": Field("float", "Clip the global gradient norm (weights and scores) to this "
                           "value; 0 disables clipping.", default=0.0, ge=0),
    "device": Field("str", "Where training runs: `auto` (CUDA when available, else the CPU), `cpu`, "
                    "`cuda` or `cuda:N`. Under torchrun each process takes the GPU of its local "
                    "rank. The Program, its masks, scores and teacher, and every batch move together.",
                    default="auto"),
    "precision": Field("str", "`fp32`, or autocast to `bf16` or `fp16` for the forward pass (fp16 "
                       "with a gradient scaler). Weights, masks and scores stay float32 and masks "
                       "are computed exactly.", default="fp32", choices=("fp32", "bf16", "fp16")),
    "checkpoint_every": Field("int", "Write a checkpoint (everything needed to resume bit-exactly: "
                              "Program state, optimizer, learning-rate schedulers, gradient scaler, "
                              "random generators, data position) every n optimizer steps; "
                              "`sparsec compile --resume` continues from the last one. 0: only at "
                              "the end, into OUT.", default=0, ge=0),
    "tensorboard": Field("bool", "Also log loss, density, learning rates and metric to TensorBoard "
                         "(OUT/tensorboard) when `torch.utils.tensorboard` can be imported; the "
                         "same values always go to OUT/train.jsonl.", default=False),
    "check_ranks": Field("bool", "Under torchrun, compare a hash of every mask across processes "
                         "after every mask update and stop on the first difference (also "
                         "`SPARSEC_CHECK_RANKS=1`).", default=False),
    "parallel": Field("str", "How processes under torchrun share the work: `ddp` (every process "
                      "holds the whole model; DistributedDataParallel all-reduces the gradients) or "
                      "`fsdp` (FSDP2 `fully_shard`: parameters, gradients and optimizer state sharded "
                      "across processes between steps, gathered for each forward and backward pass; "
                      "fp32 or bf16). Masks are identical on every process either way. One process: "
                      "no effect.", default="ddp", choices=("ddp", "fsdp")),
}

CAPTURE_FIELDS = {
    "method": Field("str", "`export` uses `torch.export.export(strict=False)`, which captures "
                    "transformers models; `symbolic_trace` uses `torch.fx.symbolic_trace`, for plain "
                    "modules; `auto` tries export first and falls back to symbolic_trace.",
                    default="auto", choices=("auto", "export", "symbolic_trace")),
    "dynamic": Field("bool", "Mark the batch and sequence dimensions of the example inputs dynamic, "
                     "so the program and its ONNX file accept other sizes.", default=True),
}
