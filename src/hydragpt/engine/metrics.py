"""Throughput and model FLOPs utilization (MFU), against a table of peak FLOP/s per device; bits per byte.

MFU = achieved model FLOP/s / the device's peak dense FLOP/s at the training precision. Peaks are
datasheet numbers (dense, no sparsity); `system.peak_flops` overrides the table for anything it misses.
"""

from __future__ import annotations

import math

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s by GPU name fragment, most specific first.
GPU_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
    ("T4", 65e12),
)
# float32 on GPUs runs on TF32 tensor cores at half the bf16 rate when matmul precision allows.
TF32_FRACTION = 0.5
# Per CPU core (AVX-512 server core at ~2.5 GHz, measured on a 2-core EPYC: ~140 GFLOP/s fp32 and
# ~400 GFLOP/s bf16 for the pair); a rough guide, so set system.peak_flops for exact MFU on CPUs.
CPU_PEAK_FLOPS_PER_CORE = {torch.float32: 70e9, torch.bfloat16: 200e9, torch.float16: 70e9}


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> float | None:
    """Peak FLOP/s of `device` at `dtype`; None when the device is not in the table."""
    if override:
        return override
    if device.type == "cpu":
        return CPU_PEAK_FLOPS_PER_CORE[dtype] * torch.get_num_threads()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops in GPU_PEAK_FLOPS:
            if fragment in name:
                return flops * (TF32_FRACTION if dtype == torch.float32 else 1.0)
    return None


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float | None) -> float | None:
    return flops_per_token * tokens_per_sec / peak if peak else None


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """A loss summed over tokens (in nats), per UTF-8 byte of the text they stand for, in bits: it does not
    depend on how the text was cut into tokens. NaN for text of no bytes."""
    return nats / n_bytes / math.log(2) if n_bytes else math.nan


def scored_targets(targets: torch.Tensor, token_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How many targets a loss scores, and the UTF-8 bytes they stand for (`token_bytes` per id); a -1
    target (a chat dataset's, outside the replies) counts neither."""
    scored = targets >= 0
    return scored.sum(), (token_bytes[targets.clamp(min=0)] * scored).sum()
