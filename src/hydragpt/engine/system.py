"""Device, precision and seeding: turns `system.*` config into torch settings, in one place."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hydragpt.errors import UserError
from hydragpt.model import GPT, GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def local_gpu(local_rank: int) -> int:
    """The GPU index of rank `local_rank` on its node: its own number, unless the cluster already bound
    each process to one GPU (SLURM's --gpus-per-task or --gpu-bind), which it then sees as GPU 0."""
    return 0 if torch.cuda.device_count() == 1 else local_rank


def resolve_device(name: str, local_rank: int | None = None, key: str = "system.device") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicitly requested device must exist. Under torchrun
    (`local_rank` given) `cuda` and `auto` mean this process's own GPU, cuda:<local_rank> (see local_gpu).
    `key` is the knob the device came from, named in the errors."""
    if local_rank is not None and name.startswith("cuda:"):
        raise UserError(
            f"{key}={name} under torchrun would put every rank on one GPU",
            f"use {key}=cuda (or auto): each rank takes GPU LOCAL_RANK",
        )
    if local_rank is not None and (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        name = f"cuda:{local_gpu(local_rank)}"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} requested but CUDA is not available", f"use {key}=cpu or {key}=auto")
        if device.index is not None:
            count = torch.cuda.device_count()
            if device.index >= count:
                raise UserError(
                    f"{key}={name} requested but only {count} GPU(s) are visible",
                    f"use {key}=cuda:0 .. cuda:{count - 1}, or check CUDA_VISIBLE_DEVICES",
                )
            torch.cuda.set_device(device)  # so pinned memory, autocast and device queries use this GPU
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={name} requested but MPS is not available", f"use {key}=cpu or {key}=auto")
    return device


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (the machine's RAM for the CPU), or None where that is not known."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def require_fits(config: GPTConfig, device: torch.device, bytes_per_param: int = 4) -> None:
    """Refuse a model whose weights alone cannot fit on `device`, before allocating any: counted on the
    meta device (no memory), so an impossible size is one error line, not a crash or the OOM killer."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(config).parameters())
    needed, available = params * bytes_per_param, device_memory(device)
    if available is not None and needed > available:
        raise UserError(
            f"the model has {params / 1e9:,.1f}B parameters: {needed / 2**30:,.0f} GiB for its weights alone,"
            f" more than the {available / 2**30:,.0f} GiB of {device}",
            "make it smaller: model.n_layer, model.n_embd, model.block_size, model.vocab_size",
        )


def resolve_dtype(name: str, device: torch.device, matmul: tuple[int, int] | None = None) -> torch.dtype:
    """`auto`: bfloat16 on GPUs that support it (float16 on older ones); on a CPU, bfloat16 where the
    training's matmuls, `matmul` = (rows, width), measure faster in it (see bf16_pays_on_cpu); else float32."""
    if name == "auto":
        if device.type == "cuda":
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native_bf16 else torch.float16  # pre-Ampere GPUs only emulate bf16
        if device.type == "cpu" and matmul is not None and bf16_pays_on_cpu(*matmul):
            return torch.bfloat16
        return torch.float32
    return DTYPES[name]


# bfloat16 autocast must make the MLP's matmul this much faster to pay for its casts and float32 elementwise
BF16_MIN_SPEEDUP = 1.3


def _seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls, after one untimed."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bf16_pays_on_cpu(rows: int, width: int, seconds: Callable[[Callable[[], object]], float] = _seconds) -> bool:
    """Whether this CPU runs a (rows x width) @ (width x 4 width) matmul, an MLP's, at least BF16_MIN_SPEEDUP
    times faster in bfloat16 (casts included) than in float32: CPUs with AMX or AVX-512 BF16 do at large
    sizes, others (AVX-512 alone) run bfloat16 several times slower. Measured, so the threshold is this
    machine's; it takes a few milliseconds. `seconds(run)` times a call (tests replace it)."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, width, generator=generator), torch.randn(4 * width, width, generator=generator)
    float32 = seconds(lambda: F.linear(x, weight))
    bfloat16 = seconds(lambda: F.linear(x.bfloat16(), weight.bfloat16()))
    return float32 >= BF16_MIN_SPEEDUP * bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[object]:
    """Mixed precision for the forward pass; weights and optimizer state stay float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def checkpoint_activations(model: GPT) -> None:
    """Keep only each block's input for the backward pass and recompute the rest there
    (`system.activation_checkpointing`): about a third more compute for a fraction of the activation
    memory, so a larger micro-batch or model fits. The blocks keep their names, so checkpoints do not
    change; under FSDP the recompute runs while the block's weights are gathered for its backward."""
    for block in model.transformer.h:
        forward = block.forward

        def recomputed(*args: Any, _forward: Any = forward) -> torch.Tensor:
            return checkpoint(_forward, *args, use_reentrant=False)

        block.forward = recomputed  # type: ignore[method-assign]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
