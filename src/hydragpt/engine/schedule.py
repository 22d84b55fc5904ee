"""Learning-rate schedules: each option of the `lr` group is a dataclass of its knobs with a `factor`.

`factor(step, total_steps)` is the multiplier of every parameter group's `initial_lr` at optimizer step
`step` of a run of `total_steps`: a pure function of the step, so a schedule has no state to save and a
resumed run picks it up exactly. Adding a schedule is one class here and one YAML under conf/lr/.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from hydragpt.errors import UserError
from hydragpt.registry import option

# Optional[...] rather than `X | None`: OmegaConf reads these annotations when the config is composed.
# ruff: noqa: UP045


def warmup(step: int, warmup_iters: int) -> float:
    """Linear warmup from 1/(warmup_iters + 1) to 1 over the first `warmup_iters` steps."""
    return (step + 1) / (warmup_iters + 1)


def _check(warmup_iters: int, min_lr_ratio: float = 0.0) -> None:
    if warmup_iters < 0:
        raise UserError(f"lr.warmup_iters must be >= 0, got {warmup_iters}", "use 0 for no warmup")
    if not 0 <= min_lr_ratio <= 1:
        raise UserError(f"lr.min_lr_ratio must be in [0, 1], got {min_lr_ratio}", "e.g. 0.1: a tenth of the peak")


@option("lr", "cosine")
class Cosine:
    """Linear warmup, then cosine decay to min_lr_ratio x the peak at decay_iters (held there after)."""

    warmup_iters: int = 100  # steps of linear warmup from ~0 to each group's peak lr
    decay_iters: Optional[int] = None  # step at which the cosine reaches its floor (null: the run's last step)
    min_lr_ratio: float = 0.1  # the floor, as a fraction of the peak lr

    def __post_init__(self) -> None:
        _check(self.warmup_iters, self.min_lr_ratio)
        if self.decay_iters is not None and self.decay_iters < 0:
            raise UserError("lr.decay_iters must be >= 0", "or null to decay until the run's last step")

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_iters:
            return warmup(step, self.warmup_iters)
        decay_iters = total_steps if self.decay_iters is None else self.decay_iters
        if step >= decay_iters:
            return self.min_lr_ratio
        progress = (step - self.warmup_iters) / (decay_iters - self.warmup_iters)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # from 1 down to 0
        return self.min_lr_ratio + cosine * (1.0 - self.min_lr_ratio)


@option("lr", "constant")
class Constant:
    """Linear warmup, then the peak lr throughout (fine-tuning, quick experiments)."""

    warmup_iters: int = 0  # steps of linear warmup from ~0 to each group's peak lr

    def __post_init__(self) -> None:
        _check(self.warmup_iters)

    def factor(self, step: int, total_steps: int) -> float:
        return warmup(step, self.warmup_iters) if step < self.warmup_iters else 1.0


@option("lr", "wsd")
class WarmupStableDecay:
    """Warmup, stable at the peak, then linear decay over the last decay_ratio of the run to
    min_lr_ratio x the peak (the modern speedruns' schedule; a run can be extended from its stable phase)."""

    warmup_iters: int = 0  # steps of linear warmup from ~0 to each group's peak lr
    decay_ratio: float = 0.2  # the last this fraction of the run decays linearly
    min_lr_ratio: float = 0.0  # where the decay ends, as a fraction of the peak lr

    def __post_init__(self) -> None:
        _check(self.warmup_iters, self.min_lr_ratio)
        if not 0 <= self.decay_ratio <= 1:
            raise UserError(f"lr.decay_ratio must be in [0, 1], got {self.decay_ratio}", "e.g. lr.decay_ratio=0.2")

    def factor(self, step: int, total_steps: int) -> float:
        if step < self.warmup_iters:
            return warmup(step, self.warmup_iters)
        decay_start = total_steps - self.decay_ratio * total_steps
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(total_steps - decay_start, 1)
        return 1.0 - min(progress, 1.0) * (1.0 - self.min_lr_ratio)


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Every parameter group's lr: its initial lr times the schedule's factor."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
