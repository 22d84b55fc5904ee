"""`train.batch_size=auto`: the largest micro-batch that fits this device, found by trying.

The candidates are the divisors of the sequences each rank contributes to an optimizer step
(`train.total_batch_size / block_size / world_size`), so that the accumulation derived from them is a
whole number and the tokens per step stay what the config says. A binary search runs two forward and
backward passes at each size it tries, while a ballast as large as AdamW's state (two floats per parameter)
holds the memory the optimizer will take. Every rank tries the same sizes and a size fits only where it
fits on all ranks, so FSDP's collectives stay in step.

An allocation that fails must be an error the process survives. On CUDA it is (OutOfMemoryError). On a
CPU it usually is not: Linux overcommits, and the OOM killer ends the process. So on a CPU the search
runs under an address-space limit (RLIMIT_AS) of what is in use now plus the memory available (the
machine's, or its cgroup's when lower), and an allocation past it fails with an error instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from hydragpt.engine.distributed import all_reduce
from hydragpt.engine.system import autocast
from hydragpt.errors import UserError
from hydragpt.model import GPT
from hydragpt.procfs import proc_kib_field

log = logging.getLogger(__name__)

OPTIMIZER_FLOATS_PER_PARAM = 2  # AdamW's two moments; Muon keeps one per matrix
# passes per trial: the second runs as accumulation's next micro-batch does, beside the first's gradients
# and whatever the allocator kept of its memory; one pass alone let a size through that then failed
TRIAL_PASSES = 2


def micro_batch_candidates(sequences_per_rank: int) -> list[int]:
    """The micro-batch sizes that divide a rank's sequences per step, smallest first."""
    return [size for size in range(1, sequences_per_rank + 1) if sequences_per_rank % size == 0]


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator refusing an allocation."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _cgroup_available(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's memory cgroup (v2, or v1) still allows, or None when it sets no limit."""
    membership = Path("/proc/self/cgroup")
    for line in membership.read_text().splitlines() if membership.is_file() else []:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            where, files = root / path.lstrip("/"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            where, files = root / "memory" / path.lstrip("/"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        limit, usage = (where / name for name in files)
        if limit.is_file() and usage.is_file():
            text = limit.read_text().strip()
            if text != "max" and int(text) < 2**60:  # v1 writes "no limit" as a number near 2**63
                return int(text) - int(usage.read_text())
    return None


def cpu_memory_limit() -> int | None:
    """The address-space limit under which a CPU allocation past the memory available fails: the one
    already set, or what is in use plus this process's share of what the machine (or its cgroup) has
    available, shared with the other ranks on the machine (torchrun's LOCAL_WORLD_SIZE), which search at
    the same time; None where neither can be read (not Linux)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        return soft
    in_use = proc_kib_field(Path("/proc/self/status"), "VmSize")
    machine = proc_kib_field(Path("/proc/meminfo"), "MemAvailable")
    available = [a for a in (machine, _cgroup_available()) if a is not None]
    if in_use is None or not available:
        return None
    return in_use + min(available) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


@contextlib.contextmanager
def allocation_failures_raise(device: torch.device) -> Iterator[None]:
    """Make running out of memory an exception on `device` for the duration (see the module's docstring)."""
    if device.type != "cpu":
        yield
        return
    limit = cpu_memory_limit()
    if limit is None:
        raise UserError(
            "train.batch_size=auto cannot tell how much memory this CPU machine has",
            "give train.batch_size a number",
        )
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(limit, hard) if hard != resource.RLIM_INFINITY else limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _fits(model: GPT, size: int, block_size: int, device: torch.device, dtype: torch.dtype, ballast: int) -> bool:
    """Whether forward and backward passes of `size` sequences run beside `ballast` bytes."""
    held: list[torch.Tensor] = []
    try:
        held.append(torch.empty(ballast, dtype=torch.uint8, device=device))
        tokens = torch.randint(model.config.vocab_size, (size, block_size + 1), device=device)
        for _ in range(TRIAL_PASSES):
            with autocast(device, dtype):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            assert loss is not None
            loss.backward()
        return True
    except (RuntimeError, torch.OutOfMemoryError) as error:
        if not is_out_of_memory(error):
            raise
        return False
    finally:
        held.clear()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_micro_batch(
    model: GPT,
    sequences_per_rank: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
    fits: Callable[[int], bool] | None = None,
) -> int:
    """The largest micro-batch among `micro_batch_candidates(sequences_per_rank)` whose training step fits
    on every rank; `fits(size)` replaces the trial pass (tests). The random state is left as it was."""
    ballast = OPTIMIZER_FLOATS_PER_PARAM * sum(p.numel() * p.element_size() for p in model.parameters())
    candidates = micro_batch_candidates(sequences_per_rank)
    low, high, best = 0, len(candidates) - 1, None  # memory grows with the size: search the sorted list
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), allocation_failures_raise(device):
        while low <= high:
            middle = (low + high) // 2
            size = candidates[middle]
            here = fits(size) if fits else _fits(model, size, block_size, device, dtype, ballast)
            everywhere = all_reduce(torch.tensor(float(here), device=device), "mean").item() == 1.0
            verdict = "fit" if everywhere else "do not fit"
            log.info("batch_size=auto: %d sequences of %d tokens %s", size, block_size, verdict)
            if everywhere:
                best, low = size, middle + 1
            else:
                high = middle - 1
    if best is None:
        raise UserError(
            f"train.batch_size=auto: not even one sequence of {block_size} tokens fits a training step on {device}",
            "make the model smaller (model.n_layer, model.n_embd, model.block_size), or set"
            " system.activation_checkpointing=true",
        )
    return best
