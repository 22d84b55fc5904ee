"""Optimizer and learning-rate schedule factories."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from hydragpt.config import LRConfig, OptimConfig

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (matmul and embedding weights) only, never on biases or
    LayerNorm gains; the fused kernel on CUDA unless `optim.fused` says otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type == "cuda" if cfg.fused is None else cfg.fused
    log.info(
        "optimizer: AdamW, %s decayed parameters in %d tensors, %s not decayed in %d, fused=%s",
        f"{sum(p.numel() for p in decay):,}",
        len(decay),
        f"{sum(p.numel() for p in no_decay):,}",
        len(no_decay),
        fused,
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_factor(step: int, cfg: LRConfig, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step `step`: linear warmup, then cosine decay to
    `min_lr` at `decay_iters` (held there after), or constant."""
    if step < cfg.warmup_iters:
        return (step + 1) / (cfg.warmup_iters + 1)
    if cfg.name == "constant":
        return 1.0
    if step >= cfg.decay_iters:
        return cfg.min_lr / base_lr
    progress = (step - cfg.warmup_iters) / (cfg.decay_iters - cfg.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # from 1 down to 0
    return (cfg.min_lr + cosine * (base_lr - cfg.min_lr)) / base_lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: LRConfig, base_lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, base_lr))
