"""Data parallelism under torchrun: one process per device, one shared run directory, averaged gradients.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address) in each process it starts;
without them a run is a single process and everything here is a no-op. Rank 0 owns the run directory
and every file in it; the other ranks learn the directory from it, write nothing, and log warnings only.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hydragpt.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def launched_env() -> DistEnv:
    """This process's place in the job, as torchrun set it in the environment (or SLURM, below)."""
    if "RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
        _export_slurm_task_env()
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def _export_slurm_task_env() -> None:
    """Hydra's submitit launcher starts every rank itself, as one SLURM task per GPU (no torchrun): set
    RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from SLURM's task variables and node list,
    as torchrun would have, so the rest of the job cannot tell the difference."""
    from submitit.helpers import TorchDistributedEnvironment

    # overwrite: a MASTER_PORT (or address) the cluster or user exported is taken into account, not refused;
    # CUDA_VISIBLE_DEVICES is left as SLURM set it (system.local_gpu picks this task's GPU)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def quiet_other_ranks(env: DistEnv) -> None:
    """Ranks other than 0 log warnings and errors only, tagged with their rank, to stderr.

    torchrun's ranks get this from `rank_arguments` before Hydra starts; ranks started by a cluster
    launcher (one SLURM task each) all start as rank 0 would and are quietened here.
    """
    if env.is_main:
        return
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def rank_arguments(argv: list[str]) -> list[str]:
    """Command-line overrides that keep ranks other than 0 from creating a run directory or a train.log."""
    env = launched_env()
    if env.is_distributed and ("-m" in argv or "--multirun" in argv):
        raise UserError(
            "a multirun (-m) cannot run under torchrun: its jobs would share one process group",
            "start the sweep without torchrun and give each job its ranks with hydra/launcher=torchrun"
            " hydra.launcher.nproc_per_node=N",
        )
    if env.is_main:
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=rank"]


def shutdown() -> None:
    """Leave the process group, once every DDP wrapper is gone (the caller drops its reference).

    The garbage collection comes first because DDP's reducer sits in reference cycles. A reducer that
    outlives the group owns gloo's group alone, and destroys it holding the GIL while it joins gloo's
    worker threads; a worker still freeing a finished object collective (the checkpoint's RNG gather)
    needs the GIL for that, and the rank hangs at exit.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (the identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (tensors allowed), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # object collectives pickle plainly, which CPU tensors do not survive
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in gathered]


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
    """Sum or mean of `tensor` over all ranks, in place (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor
