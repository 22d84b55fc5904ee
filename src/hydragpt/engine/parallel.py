"""How a model is spread over the ranks of a torchrun job: each option of the `ddp` group is a dataclass of
its knobs whose methods the Trainer and the Checkpointer call, without knowing which one it is.

- `none`: one process on one device; refuses to run as several.
- `ddp`: DistributedDataParallel, gradients averaged over ranks in backward.
- `fsdp`: FSDP2's `fully_shard` on every block and on the model: each rank holds 1/world_size of the
  weights, gradients and optimizer state. Checkpoints gather the full weights and the full optimizer state
  (numbered as `Optimizer.state_dict()` numbers them), so they sample with `sample.py` as they are and
  resume under any option and world size.

A job of one process runs every option as a plain model. torch's FSDP and distributed-checkpoint modules
are imported where used: they take most of a second to import, which a run that does not shard would pay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hydragpt.engine.distributed import DistEnv
from hydragpt.engine.system import local_gpu
from hydragpt.errors import UserError
from hydragpt.model import GPT
from hydragpt.registry import option

BACKENDS = ("auto", "gloo", "nccl")


@option("ddp", "none")
class SingleProcess:
    """A single process on a single device; refuses to run under torchrun with several processes."""

    def setup(self, env: DistEnv, device: str) -> None:
        """Join the job's process group (here: make sure there is no job)."""
        if env.is_distributed:
            raise UserError(
                f"launched as {env.world_size} processes but ddp=none runs a single process",
                "drop ddp=none (ddp=ddp is the default), or launch one process",
            )

    def shard(self, model: GPT, dtype: torch.dtype) -> None:
        """Spread the weights over the ranks, before the optimizer is built (only FSDP does)."""

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training forward and backward run through."""
        return model

    def accumulating(self, model: nn.Module) -> AbstractContextManager[None]:
        """Around the micro-steps of an accumulation but the last: no gradient communication."""
        return contextlib.nullcontext()

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A result computed from sharded tensors (the gradient norm) as a plain tensor."""
        return tensor

    def model_state(self, model: GPT) -> dict[str, torch.Tensor]:
        """The full weights, on every rank (gathered ones: on rank 0, the others get {})."""
        return model.state_dict()

    def optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)


@dataclass
class _ProcessGroup(SingleProcess):
    """What the multi-process options share: joining the process group."""

    backend: str = "auto"  # auto: nccl on GPUs, gloo on CPUs; or nccl / gloo
    timeout: int = 600  # seconds a collective waits for a missing rank before the job fails

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown ddp.backend '{self.backend}'", f"use one of: {', '.join(BACKENDS)}")
        if self.timeout < 1:
            raise UserError("ddp.timeout must be >= 1 second", "e.g. ddp.timeout=600")

    def setup(self, env: DistEnv, device: str) -> None:
        if not env.is_distributed or dist.is_initialized():
            return
        backend = self.backend
        if backend == "auto":
            uses_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
            backend = "nccl" if uses_cuda else "gloo"
        if backend == "nccl":  # before any collective: NCCL puts its buffers on the current GPU
            torch.cuda.set_device(local_gpu(env.local_rank))
        dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@option("ddp", "ddp")
class DataParallel(_ProcessGroup):
    """DistributedDataParallel under torchrun: one process per device, gradients averaged in backward."""

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not _distributed():
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def accumulating(self, model: nn.Module) -> AbstractContextManager[None]:
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()


@option("ddp", "fsdp")
class FullySharded(_ProcessGroup):
    """FSDP2 under torchrun: weights, gradients and optimizer state sharded over the ranks, one block
    gathered at a time; for when weights + gradients + AdamW's moments (16 bytes a parameter) do not fit."""

    reshard_after_forward: bool = True  # free gathered weights after forward (ZeRO-3); false keeps them (ZeRO-2)

    def shard(self, model: GPT, dtype: torch.dtype) -> None:
        """One all-gather unit per block, and the root for embeddings, final norm and head. Under bfloat16
        the gathered weights are cast to it for compute and gradients are reduced in float32."""
        if not _distributed():
            return
        if dtype == torch.float16:
            raise UserError("ddp=fsdp does not support float16", "use system.dtype=bfloat16 or float32")
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        param_dtype = dtype if dtype == torch.bfloat16 else None
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        fully_shard(model, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)

    @contextlib.contextmanager
    def _local_gradients(self, model: nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def accumulating(self, model: nn.Module) -> AbstractContextManager[None]:
        return self._local_gradients(model) if _distributed() else contextlib.nullcontext()

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def model_state(self, model: GPT) -> dict[str, torch.Tensor]:
        if not _distributed():
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_on_rank0())

    def optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state as `Optimizer.state_dict()` lays it out (parameters numbered in group order)."""
        if not _distributed():
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name = get_optimizer_state_dict(model, optimizer, options=_full_on_rank0())
        if not by_name:  # ranks other than 0
            return {}
        index = {name: i for i, name in enumerate(_names(by_name))}
        return {
            "state": {index[name]: state for name, state in by_name["state"].items()},
            "param_groups": [
                {**group, "params": [index[n] for n in group["params"]]} for group in by_name["param_groups"]
            ],
        }

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a full, numbered optimizer state (from any checkpoint) into this rank's shards."""
        if not _distributed():
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        names = _names(get_optimizer_state_dict(model, optimizer))  # this optimizer's parameter order
        by_name = {
            "state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [
                {**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]
            ],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _full_on_rank0() -> Any:
    """Gathered on rank 0 only, in CPU memory: the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names(by_name: dict[str, Any]) -> list[str]:
    return [name for group in by_name["param_groups"] for name in group["params"]]
