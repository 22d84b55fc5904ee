"""Generation benchmark: tokens/s with the KV cache against recomputing the whole context each step.

Both modes generate greedily from the same prompt, alternating (A B A B, since this kind of machine is
noisy); the report gives each run, the medians, the speed-up, and whether the two produced the same
tokens (they must: see `sampling.window_start`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from hydragpt.engine.checkpoint import load_checkpoint
from hydragpt.engine.system import autocast, resolve_device, resolve_dtype
from hydragpt.model import GPT
from hydragpt.sampling import generate, load_model
from hydragpt.train_config import BenchSampleConfig

MODES = {True: "kv cache", False: "recompute"}


def bench_sample(cfg: BenchSampleConfig) -> str:
    """The comparison as Markdown."""
    device = resolve_device(cfg.device, key="device")
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    if cfg.ckpt:
        model, _ = load_model(load_checkpoint(Path(cfg.ckpt)), device)
        what = f"checkpoint {cfg.ckpt}"
    else:
        model = GPT(replace(cfg.model, vocab_size=cfg.vocab_size, dropout=0.0)).eval().to(device)
        what = f"{cfg.model.name} with random weights"
    vocab = model.config.vocab_size
    assert vocab is not None
    prompt = torch.randint(vocab, (cfg.num_samples, cfg.prompt_tokens), device=device)
    lines = [
        f"{what}: {model.num_params() / 1e6:.2f}M parameters, block {model.config.block_size}; {cfg.num_samples} x"
        f" {cfg.max_new_tokens} new tokens after a {cfg.prompt_tokens}-token prompt, greedy, {device}, "
        f"{str(dtype).removeprefix('torch.')}",
        "",
        "| round | mode | seconds | tokens/s |",
        "|---|---|---|---|",
    ]
    speeds: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, torch.Tensor] = {}
    for round_ in range(cfg.repeats):
        for use_cache in (True, False):
            start = time.perf_counter()
            with autocast(device, dtype):
                steps = generate(model, prompt, cfg.max_new_tokens, temperature=0.0, use_cache=use_cache)
                outputs[use_cache] = torch.cat(list(steps), dim=1)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the clock stops when the GPU is done, not when it was told
            seconds = time.perf_counter() - start
            speeds[use_cache].append(cfg.num_samples * cfg.max_new_tokens / seconds)
            lines.append(f"| {round_ + 1} | {MODES[use_cache]} | {seconds:.2f} | {speeds[use_cache][-1]:,.0f} |")
    cached, recomputed = statistics.median(speeds[True]), statistics.median(speeds[False])
    same = torch.equal(outputs[True], outputs[False])
    lines += [
        "",
        f"median tokens/s: kv cache {cached:,.0f}, recompute {recomputed:,.0f}; speed-up {cached / recomputed:.1f}x;"
        f" identical greedy tokens: {'yes' if same else 'NO'}",
    ]
    return "\n".join(lines)
