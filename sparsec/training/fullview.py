"""Whole tensors for the code that needs a sharded parameter whole, under FSDP2.

With `torch.distributed.fsdp.fully_shard` every process holds one shard (a DTensor, `Shard(0)`) of
each parameter, of its gradient and of the optimizer's state, between the forward/backward passes
that gather them. sparsec's Program reads and writes whole tensors outside those passes: a mask
update ranks every score of a group, `pins` reads the gradient and the optimizer's update, a
checkpoint saves the whole state, `dynsparse` zeroes the moments of re-allocated blocks. `whole()`
gives that code the plain tensors it expects, without changing it:

    with whole(prog, optimizer):      # every process: all-gathers (a collective)
        prog.step()                   # sees plain parameters, gradients and optimizer state
    # on exit each process copies its own shard back out of the whole tensors (no communication)

Every process computes the same thing from the same gathered values, so what the block writes is
identical everywhere and each keeps its own slice. `release()` turns the parameters back into plain
ones for good, after training (rank 0 then writes OUT from them).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def _owners(root: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """For every DTensor parameter (by id): the modules and attribute names that hold it (a tied
    parameter is held by several)."""
    held: dict[int, list[tuple[torch.nn.Module, str]]] = collections.defaultdict(list)
    for module in root.modules():
        for name, param in module._parameters.items():
            if isinstance(param, DTensor):
                held[id(param)].append((module, name))
    return held


def _gathered(tensor: DTensor) -> torch.Tensor:
    with torch.no_grad():
        return tensor.full_tensor().detach()


def _shard_of(whole_value: torch.Tensor, like: DTensor) -> DTensor:
    """`whole_value` split as `like` is, each process keeping its own part (no communication)."""
    return distribute_tensor(whole_value.detach(), like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def whole(root: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
          grads: bool = True) -> Iterator[None]:
    """Within the block, every sharded parameter of `root` is a plain whole parameter (with its
    whole gradient when `grads`), and `optimizer` (when given) refers to them, with whole state
    tensors. On exit the values the block left (changed in place, or loaded) go back into the
    shards. A collective: every process must enter it."""
    owners = _owners(root)
    if not owners:
        yield
        return
    sharded: dict[int, DTensor] = {}
    plain: dict[int, torch.nn.Parameter] = {}
    for module, name in (pair for pairs in owners.values() for pair in pairs):
        param = module._parameters[name]
        if id(param) not in plain:
            whole_param = torch.nn.Parameter(_gathered(param), requires_grad=param.requires_grad)
            if grads and param.grad is not None:
                whole_param.grad = _gathered(param.grad)
            sharded[id(param)], plain[id(param)] = param, whole_param
    back = {id(plain[key]): sharded[key] for key in plain}
    for key, pairs in owners.items():
        for module, name in pairs:
            module._parameters[name] = plain[key]
    hooks = _set_aside_fsdp_load_hooks({id(m): m for pairs in owners.values() for m, _ in pairs}.values())
    if optimizer is not None:
        _swap_optimizer(optimizer, plain, whole_state=True)
    try:
        yield
    finally:
        for key, pairs in owners.items():
            for module, name in pairs:
                module._parameters[name] = sharded[key]
        for module, held in hooks:
            module._load_state_dict_post_hooks.update(held)
        with torch.no_grad():
            for key, whole_param in plain.items():
                shard = sharded[key]
                shard.to_local().copy_(_shard_of(whole_param, shard).to_local())
        if optimizer is not None:
            _swap_optimizer(optimizer, back, whole_state=False)


def _set_aside_fsdp_load_hooks(modules: Any) -> list[tuple[torch.nn.Module, dict[int, Any]]]:
    """FSDP2 re-points a module's sharded parameters after `load_state_dict`; within the view the
    module holds plain ones (loaded in place, split back on exit), so its hooks wait outside."""
    held = []
    for module in modules:
        hooks = module._load_state_dict_post_hooks
        fsdp = {k: h for k, h in hooks.items()
                if getattr(h, "__module__", "").startswith("torch.distributed.fsdp")}
        for k in fsdp:
            del hooks[k]
        held.append((module, fsdp))
    return held


def _swap_optimizer(optimizer: torch.optim.Optimizer, mapping: dict[int, torch.nn.Parameter],
                    whole_state: bool) -> None:
    """Point `optimizer`'s groups and state at the parameters `mapping` gives for each id; the
    state tensors shaped like their parameter are gathered whole (`whole_state`) or split back."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
    state: dict[Any, Any] = collections.defaultdict(dict)
    for param, values in optimizer.state.items():
        target = mapping.get(id(param), param)
        moved = {}
        for key, value in values.items():
            if whole_state and isinstance(value, DTensor):
                value = _gathered(value)
            elif not whole_state and isinstance(target, DTensor) and isinstance(value, torch.Tensor) \
                    and not isinstance(value, DTensor) and value.shape == target.shape:
                value = _shard_of(value, target)
            moved[key] = value
        state[target] = moved
    optimizer.state = state


def release(root: torch.nn.Module) -> None:
    """Replace every sharded parameter of `root` by a plain whole one, for good (a collective)."""
    owners = _owners(root)
    done: dict[int, torch.nn.Parameter] = {}
    for key, pairs in owners.items():
        for module, name in pairs:
            param = module._parameters[name]
            if key not in done:
                done[key] = torch.nn.Parameter(_gathered(param).clone(), requires_grad=param.requires_grad)
            module._parameters[name] = done[key]
