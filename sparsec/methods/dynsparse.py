"""DynSparse: always-sparse training with block prune-and-regrow (Dietrich et al. 2022,
*Towards Structured Dynamic Sparse Pre-Training of BERT*, Algorithm 1, Eq 1-3).

The formulas are plain functions so that they can be checked by hand:

    block_norm(W, block, norm)          L^p norm of every block, p = 1, 2, inf          (Eq 1)
    prune_ratio_at(t, total, p_r)       cosine decay p_r(t) = p_r / 2 (1 + cos(pi t / T))
    group_lasso(W, block, lambda, ...)  lambda w_std sqrt(B) sum_b sqrt(sum_b W^2 + eps)  (Eq 2)
    sparse_learning_rate(lr, density)   eta(s) = eta(0) exp(1.969 s^2 + 0.2905 s)        (Eq 3)
    explored_fraction(prog)             the explored degrees of freedom (DOF, section 3.1)
"""
from __future__ import annotations

import hashlib
import math

import torch

from sparsec import blocks, masking, ops
from sparsec.errors import SpecError, TrainingError
from sparsec.methods.base import MaskContext, Method, SiteState, StepContext, register
from sparsec.methods.pins import applied_update
from sparsec.schema import Field
from sparsec.site import Site

NORMS = ("l1", "l2", "linf")
DECAYS = ("cosine", "constant")
W_STD = 0.02       # the paper's truncated-normal initialization range (Appendix A), Eq 2's w_std
LASSO_EPS = 1e-6   # Eq 2's epsilon


# ------------------------------------------------------------------------------------ formulas
def block_norm(weight: torch.Tensor, block: tuple[int, int], norm: str) -> torch.Tensor:
    """L^p(B) = (sum_ij |B_ij|^p)^(1/p) of every block of `weight` (Dietrich et al. 2022, Eq 1),
    for p = 1 (`l1`), 2 (`l2`) and infinity (`linf`: max |B_ij|). Returns the block grid."""
    a = weight.detach().abs()
    if norm == "l1":
        return blocks.block_reduce(a, block, "sum")
    if norm == "l2":
        return blocks.block_reduce(a * a, block, "sum").sqrt()
    if norm == "linf":
        return blocks.block_reduce(a, block, "max")
    raise ValueError(f"unknown norm {norm!r} (allowed: {', '.join(NORMS)})")


def prune_ratio_at(t: int, total: int, prune_ratio: float, decay: str = "cosine") -> float:
    """The fraction p_r(t) of kept blocks pruned (and re-allocated) at the update of step t.

    `cosine` (Dietrich et al. 2022 section 2.1, after Evci et al. 2019):
        p_r(t) = p_r / 2 * (1 + cos(pi t / T))   for t < T,   0 for t >= T,
    so p_r(0) = p_r (the "pruning ratio") decaying to 0 at T = `schedule.total`.
    `constant`: p_r for t < T (for every t when T = 0), the baseline the paper compares against.
    """
    if decay == "constant":
        return prune_ratio if total <= 0 or t < total else 0.0
    if decay != "cosine":
        raise ValueError(f"unknown decay {decay!r} (allowed: {', '.join(DECAYS)})")
    if total <= 0 or t >= total:
        return 0.0
    return prune_ratio * 0.5 * (1.0 + math.cos(math.pi * t / total))


def lasso_block_factor(block: tuple[int, int]) -> float:
    """sqrt(B) of Eq 2, B the block size: for the paper's square B x B blocks B is the side; for a
    [r, c] block we take the side of the square of the same area, B = sqrt(r c)."""
    return math.sqrt(math.sqrt(block[0] * block[1]))


def group_lasso(weight: torch.Tensor, block: tuple[int, int], lam: float, w_std: float = W_STD,
                eps: float = LASSO_EPS, keep: torch.Tensor | None = None) -> torch.Tensor:
    """R(W) = lambda * w_std * sqrt(B) * sum_b sqrt(sum_{(r,s) in b} W_rs^2 + eps), summed over the
    blocks b (only the kept ones when a block-grid `keep` is given).

    Its gradient dR/dW_ij = lambda w_std sqrt(B) W_ij / sqrt(sum_{B(i,j)} W_rs^2 + eps) is the
    group-lasso term of Dietrich et al. 2022, Eq 2, divided by the learning rate eta(t). The method
    applies it decoupled from Adam (`group_lasso_step`), as the paper does; this value is for
    reading (a gradient through the loss would be rescaled by Adam).
    """
    sq = blocks.block_reduce(weight * weight, block, "sum")
    norms = torch.sqrt(sq + eps)
    if keep is not None:
        norms = norms * keep.to(norms.dtype)
    return lam * w_std * lasso_block_factor(block) * norms.sum()


@torch.no_grad()
def group_lasso_step(weight: torch.Tensor, block: tuple[int, int], lam: float, lr: float,
                     w_std: float = W_STD, eps: float = LASSO_EPS) -> torch.Tensor:
    """The decoupled group-lasso update of Dietrich et al. 2022, Eq 2, for weights W:

        dW_ij = - eta(t) * lambda * w_std * sqrt(B) * W_ij / sqrt(sum_{(r,s) in B(i,j)} W_rs^2 + eps)

    applied next to the optimizer's update as AdamW's decoupled weight decay (Loshchilov & Hutter
    2017), not through the loss. Returns dW (shaped like W)."""
    w = weight.detach()
    norms = torch.sqrt(blocks.block_reduce(w * w, block, "sum") + eps)
    per_weight = blocks.expand(norms, tuple(w.shape), block)
    return -lr * lam * w_std * lasso_block_factor(block) * w / per_weight


def sparse_learning_rate(dense_lr: float, density: float) -> float:
    """eta(s) = eta(s = 0) * exp(1.969 s^2 + 0.2905 s) with sparsity s = 1 - density (Dietrich et
    al. 2022, Eq 3, the fit of Eq 8): the learning rate of a sparse model from the optimal learning
    rate `dense_lr` of the dense model of the same size. sparsec never changes the optimizer: pass
    the result as `[train] lr` or to your optimizer yourself. E.g. density 0.1: x6.40 (BERT-Medium
    2e-4 -> 1.28e-3, the best value of the paper's Table A.14)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density {density} is out of range (0 < density <= 1)")
    s = 1.0 - density
    return dense_lr * math.exp(1.969 * s * s + 0.2905 * s)


def generator_for(seed: int, step: int, site: str) -> torch.Generator:
    """A CPU generator whose state is a pure function of (seed, step, site): the random choices of
    an update do not depend on history, so a resumed run draws exactly what the original drew."""
    digest = hashlib.sha256(f"dynsparse:{seed}:{step}:{site}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def explored_fraction(prog) -> float:
    """The explored degrees of freedom (DOF, Dietrich et al. 2022 section 3.1): the fraction of the
    weights of the dynsparse sites that have been active at any point of training."""
    explored = total = 0
    for state in prog.site_states():
        if state.site.method != DynSparse.name:
            continue
        full = blocks.expand(state.buffers["explored"], state.site.shape, state.site.block)
        explored += int(torch.count_nonzero(full))
        total += full.numel()
    return explored / total if total else 0.0


# -------------------------------------------------------------------------------------- method
@register
class DynSparse(Method):
    """Structured DynSparse training (Dietrich et al. 2022, Algorithm 1): always-sparse training.

    - Initialize: a random block pattern at the group's `density` (seeded by `seed`), from step 0;
      the density never changes (use `[schedule] kind = "constant"`; other kinds are rejected).
      Dead weights are set to zero.
    - Every `schedule.every` steps (T/n in Algorithm 1), in each weight tensor: prune the fraction
      p_r(t) of the kept blocks with the smallest L^p norm (`norm`, Eq 1) and re-allocate as many
      blocks uniformly at random among the blocks dead after pruning (random re-allocation,
      section 2.1); p_r(t) decays from `prune_ratio` to 0 at `schedule.total` (cosine, `decay`).
      The number of kept blocks is unchanged, so the density is exact (blocks are swapped within
      the same size class when partial edge blocks exist).
    - Re-allocated blocks start from zero weights and zero optimizer state (Adam exp_avg,
      exp_avg_sq, max_exp_avg_sq; SGD momentum_buffer: every state tensor shaped like the weight);
      this includes a block pruned and drawn again in the same update (Algorithm 1 re-allocates
      it: its old weights and moments are gone). The tensors are
      read from the attached optimizer (`prog.attach_optimizer(opt)` or `prog.step(optimizer=opt)`).
      The state of pruned blocks is zeroed too, so dead weights take no update.
    - Dead weights get no gradient (dL/dW = dL/dW_eff * M) and are zeroed at every `prog.step()`.
    - `lambda` > 0 applies the group lasso of Eq 2 decoupled from Adam at every `prog.step()`: each
      kept weight moves by -eta(t) lambda w_std sqrt(B) W_ij / sqrt(sum_block W^2 + eps), eta(t)
      the weight's learning rate in the attached optimizer and W the weight before the optimizer's
      update (`group_lasso_step`), like AdamW's weight decay; nothing is added to the loss.
    - The sparse learning-rate rule (Eq 3) is `sparsec.methods.dynsparse.sparse_learning_rate`;
      the optimizer is never changed by sparsec.

    Per-site state: `<site>_explored`, the block grid of blocks ever active (the paper's explored
    degrees of freedom, `explored_fraction(prog)`). The random draws of an update come from a
    generator derived from (seed, step, site) only, so `prog.state_dict()` resumes bit-exactly.
    """

    name = "dynsparse"
    summary = ("always-sparse training: random block-sparse init, every `every` steps prune the "
               "smallest-norm blocks (Eq 1) and regrow as many at random with zeroed weights and "
               "optimizer moments, cosine-decayed ratio; group lasso (Eq 2); sparse LR rule Eq 3 "
               "as `sparsec.methods.dynsparse.sparse_learning_rate` (DynSparse, Algorithm 1); "
               "needs `schedule.kind = \"constant\"`, `scope = \"local\"` and the attached optimizer")
    paper = "Dietrich et al. 2022, Algorithm 1, Eq 1, 2, 3"
    scopes = ("local",)
    balances = False   # random initial blocks and prune/regrow per site, not Top_v per row
    state = ("explored",)
    schedule_kinds = ("constant",)  # always sparse: the group's density from step 0
    options = {
        "norm": Field("str", "Block pruning metric, the L^p norm of Eq 1: `l1` (sum |W|, the paper's "
                      "best, Table A.7), `l2` or `linf` (max |W|).", default="l1", choices=NORMS),
        "prune_ratio": Field("float", "Pruning ratio p_r: the fraction of each tensor's kept blocks "
                             "pruned and re-allocated at the first update, decaying to 0 at "
                             "`schedule.total` (0.5 is the paper's best, Tables A.3 and A.5; 0 "
                             "is static sparsity).", default=0.5, ge=0, le=1),
        "decay": Field("str", "Decay of the pruning ratio over training: `cosine` (the paper, after "
                       "RigL) or `constant`.", default="cosine", choices=DECAYS),
        "seed": Field("int", "Seed of the random initial pattern and of the random re-allocation "
                      "(each update's draws derive from (seed, step, site)).", default=0, ge=0),
        "lambda": Field("float", "Group-lasso coefficient lambda_group of Eq 2, applied decoupled "
                        "at every `prog.step()` like AdamW's weight decay: each kept weight moves by "
                        "-lr * lambda * w_std * sqrt(B) * W / sqrt(sum over its block of W^2 + 1e-6), "
                        "lr the weight's current learning rate (not through the loss, where Adam "
                        "would rescale it); 0 disables it (the paper finds weight decay as "
                        "good, Figure 6). The sparse learning-rate rule of Eq 3 is "
                        "`sparsec.methods.dynsparse.sparse_learning_rate(dense_lr, density)`.",
                        default=0.0, ge=0),
        "w_std": Field("float", "w_std of Eq 2, the standard deviation of the weights at "
                       "initialization (0.02 in the paper).", default=W_STD, gt=0),
    }

    def init_state(self, weight: torch.Tensor, site: Site) -> dict[str, torch.Tensor]:
        grid = blocks.grid_shape(site.shape, site.block)
        return {"explored": torch.zeros(grid, dtype=weight.dtype, device=weight.device)}

    def mask_op(self):
        return ops.apply_mask

    # ----------------------------------------------------------------------------- masks
    @torch.no_grad()
    def select(self, states: list[SiteState], density: float, scope: str,
               context: MaskContext) -> list[torch.Tensor]:
        decay = str(self.opts["decay"])
        if decay == "cosine" and context.total < 1 and float(self.opts["prune_ratio"]) > 0:
            raise SpecError(["schedule.total: 0 is out of range for method 'dynsparse' with decay "
                             "'cosine' (allowed: the number of training steps T, >= 1, over which the "
                             "pruning ratio decays to 0)"])
        if context.step == 0:
            return [self._initial(st, density, context) for st in states]
        ratio = prune_ratio_at(context.step, context.total, float(self.opts["prune_ratio"]), decay)
        return [self._update(st, ratio, context) for st in states]

    def _initial(self, st: SiteState, density: float, context: MaskContext) -> torch.Tensor:
        """A random block pattern with round(density * n) blocks of each block-size class."""
        sizes = blocks.block_sizes(st.site.shape, st.site.block).reshape(-1)
        gen = generator_for(int(self.opts["seed"]), 0, st.site.name)
        keep = torch.zeros(sizes.numel(), dtype=torch.bool)
        for size in torch.unique(sizes).tolist():
            members = torch.nonzero(sizes == size).flatten()
            k = math.floor(density * members.numel() + 0.5)
            keep[members[torch.randperm(members.numel(), generator=gen)[:k]]] = True
        if not bool(keep.any()):  # at least one block per tensor, as Top_v's local scope
            keep[int(torch.argmax(sizes))] = True
        keep = keep.reshape(blocks.grid_shape(st.site.shape, st.site.block)).to(st.mask.device)
        self._reset(st, ~keep, context.optimizer, required=False)
        st.buffers["explored"].copy_(keep)
        return keep

    def _update(self, st: SiteState, ratio: float, context: MaskContext) -> torch.Tensor:
        """Prune round(ratio * kept) smallest-norm blocks and regrow as many at random (per size
        class), zeroing the weights and optimizer state of every block not kept throughout."""
        block = st.site.block
        old = blocks.block_reduce(st.mask, block, "max") > 0
        if ratio <= 0.0:
            return old
        grid = old.shape
        sizes = blocks.block_sizes(st.site.shape, block).reshape(-1).to(old.device)
        norms = block_norm(st.weight, block, str(self.opts["norm"])).reshape(-1).float()
        gen = generator_for(int(self.opts["seed"]), context.step, st.site.name)
        keep = old.reshape(-1).clone()
        pruned = torch.zeros_like(keep)
        for size in torch.unique(sizes).tolist():
            kept = torch.nonzero(keep & (sizes == size)).flatten()
            k = math.floor(ratio * kept.numel() + 0.5)
            if k == 0:
                continue
            order = torch.sort(norms[kept], stable=True).indices  # smallest first, ties by position
            keep[kept[order[:k]]] = False
            pruned[kept[order[:k]]] = True
            dead = torch.nonzero(~keep & (sizes == size)).flatten()
            pick = torch.randperm(dead.numel(), generator=gen)[:k].to(dead.device)
            keep[dead[pick]] = True
        keep = keep.reshape(grid)
        # only the blocks kept and not pruned keep their weights and moments; a block pruned and
        # drawn again is re-allocated (Algorithm 1): zero weights, zero moments
        survived = old & ~pruned.reshape(grid)
        self._reset(st, ~survived, context.optimizer, required=True)
        st.buffers["explored"].copy_(torch.maximum(st.buffers["explored"], keep.to(st.buffers["explored"].dtype)))
        return keep

    def _reset(self, st: SiteState, grid: torch.Tensor, optimizer: torch.optim.Optimizer | None,
               required: bool) -> None:
        """Zero the weights and every weight-shaped optimizer state tensor on the blocks of `grid`
        (Algorithm 1: re-allocated parameters and their Adam moments start at zero)."""
        where = blocks.expand(grid, st.site.shape, st.site.block).to(st.weight.device)
        st.weight.data.masked_fill_(where, 0.0)
        if optimizer is None:
            if required:
                raise TrainingError(
                    "method 'dynsparse' zeroes the optimizer moments of re-allocated blocks "
                    "(Dietrich et al. 2022, Algorithm 1) but no optimizer is attached: call "
                    "prog.attach_optimizer(optimizer) once, or prog.step(optimizer=optimizer)")
            return
        if not any(p is st.weight for g in optimizer.param_groups for p in g["params"]):
            raise TrainingError(f"method 'dynsparse': the weight of site {st.site.name!r} is not in "
                                f"the attached optimizer's parameters")
        for value in optimizer.state.get(st.weight, {}).values():
            if torch.is_tensor(value) and value.shape == st.weight.shape:
                value.masked_fill_(where.to(value.device), 0)

    # ------------------------------------------------------------------ decoupled group lasso
    def after_step(self, states: list[SiteState], context: StepContext) -> None:
        lam = float(self.opts["lambda"])
        if lam > 0.0:
            self._group_lasso(states, context, lam)
        masking.zero_pruned(states)  # dead weights stay zero

    @torch.no_grad()
    def _group_lasso(self, states: list[SiteState], context: StepContext, lam: float) -> None:
        """Eq 2, decoupled: W <- W + group_lasso_step(W_before) on the kept blocks, with the
        weight's learning rate in the attached optimizer and W_before the weight the optimizer's
        update started from (recovered exactly from its state, as for AdamW's decay)."""
        optimizer = context.optimizer
        if optimizer is None:
            raise TrainingError("method 'dynsparse' with lambda > 0 applies the group lasso (Eq 2) "
                                "scaled by the learning rate: call prog.attach_optimizer(optimizer) "
                                "once, or prog.step(optimizer=optimizer)")
        for st in states:
            group = next((g for g in optimizer.param_groups if any(p is st.weight for p in g["params"])), None)
            if group is None:
                raise TrainingError(f"method 'dynsparse': the weight of site {st.site.name!r} is not "
                                    f"in the attached optimizer's parameters")
            grad = st.weight.grad if st.weight.grad is not None else torch.zeros_like(st.weight)
            before = applied_update(optimizer, group, st.weight, grad)[1]
            step = group_lasso_step(before, st.site.block, lam, float(group["lr"]), float(self.opts["w_std"]))
            st.weight.data.add_(step * st.mask)
