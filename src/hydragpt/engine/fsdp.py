"""Fully sharded data parallel (`ddp=fsdp`): FSDP2's `fully_shard` on every transformer block, then on the
model, so each rank holds 1/world_size of the weights, gradients and optimizer state.

Checkpoints stay in the one-file format of SPEC §4: the full weights and the full optimizer state are
gathered (to CPU, on rank 0) when saving, in the same layout `Optimizer.state_dict()` has without FSDP.
So an FSDP checkpoint samples with `sample.py` as it is, and resumes under FSDP, DDP or one process,
on any number of ranks; and the other way round.

torch's FSDP and distributed-checkpoint modules are imported where used, not here: they take most of a
second to import, which every start of a run that does not shard (and every test) would pay.
"""

from __future__ import annotations

from typing import Any

import torch

from hydragpt.model import GPT


def shard_model(model: GPT, reshard_after_forward: bool, dtype: torch.dtype) -> None:
    """Shard in place: one all-gather unit per block, and the root for embeddings, final norm and head.

    Under bfloat16 the gathered weights are cast to it for compute and gradients are reduced in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype = dtype if dtype == torch.bfloat16 else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in model.transformer.h:
        fully_shard(block, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=policy)


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Accumulate local gradients on every micro-step but the last, like DDP's no_sync."""
    from torch.distributed.fsdp import FSDPModule

    assert isinstance(model, FSDPModule)
    model.set_requires_gradient_sync(sync)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_on_rank0())


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as `Optimizer.state_dict()` lays it out (parameters numbered in group order)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_on_rank0())
    if not by_name:  # ranks other than 0
        return {}
    index = {name: i for i, name in enumerate(_names(by_name))}
    return {
        "state": {index[name]: state for name, state in by_name["state"].items()},
        "param_groups": [{**group, "params": [index[n] for n in group["params"]]} for group in by_name["param_groups"]],
    }


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full, numbered optimizer state (from any checkpoint) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    names = _names(get_optimizer_state_dict(model, optimizer))  # this optimizer's parameter order
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded result (the gradient norm) as a plain tensor; only a DTensor has `full_tensor`."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _full_on_rank0() -> Any:
    """Gathered on rank 0 only, in CPU memory: the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names(by_name: dict[str, Any]) -> list[str]:
    return [name for group in by_name["param_groups"] for name in group["params"]]
