"""Generation benchmark: tokens/s with the KV cache against recomputing the whole context each step, for
each batch size (sequences generated together: one user, or a batch of samples).

Both modes generate greedily from the same prompts, alternating (A B A B, since this kind of machine is
noisy); the report gives each run, then per batch size the medians, the speed-up, and whether the two
produced the same tokens (they must: see `sampling.window_start`).
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
    prompts = torch.randint(vocab, (max(cfg.batch_sizes), cfg.prompt_tokens), device=device)
    lines = [
        f"{what}: {model.num_params() / 1e6:.2f}M parameters, block {model.config.block_size}; {cfg.max_new_tokens}"
        f" new tokens per sequence after a {cfg.prompt_tokens}-token prompt, greedy, {device},"
        f" {str(dtype).removeprefix('torch.')}{'; the cached step compiled' if cfg.compile else ''}",
        "",
        "| round | batch | mode | seconds | tokens/s |",
        "|---|---|---|---|---|",
    ]
    if cfg.compile:  # compiling is not generating: once per batch size, before the clock runs
        for batch in cfg.batch_sizes:
            with autocast(device, dtype):
                list(generate(model, prompts[:batch], 2, temperature=0.0, compile=True))
    speeds: dict[tuple[int, bool], list[float]] = {}
    outputs: dict[tuple[int, bool], torch.Tensor] = {}
    for round_ in range(cfg.repeats):
        for batch in cfg.batch_sizes:
            for use_cache in (True, False):
                start = time.perf_counter()
                with autocast(device, dtype):
                    steps = generate(
                        model,
                        prompts[:batch],
                        cfg.max_new_tokens,
                        temperature=0.0,
                        use_cache=use_cache,
                        compile=cfg.compile and use_cache,
                    )
                    outputs[batch, use_cache] = torch.cat(list(steps), dim=1)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the clock stops when the GPU is done, not when it was told
                seconds = time.perf_counter() - start
                speeds.setdefault((batch, use_cache), []).append(batch * cfg.max_new_tokens / seconds)
                lines.append(
                    f"| {round_ + 1} | {batch} | {MODES[use_cache]} | {seconds:.2f}"
                    f" | {speeds[batch, use_cache][-1]:,.0f} |"
                )
    lines += ["", "| batch | kv cache tokens/s | recompute tokens/s | speed-up | identical greedy tokens |"]
    lines.append("|---|---|---|---|---|")
    for batch in cfg.batch_sizes:
        cached, recomputed = statistics.median(speeds[batch, True]), statistics.median(speeds[batch, False])
        same = torch.equal(outputs[batch, True], outputs[batch, False])
        lines.append(
            f"| {batch} | {cached:,.0f} | {recomputed:,.0f} | {cached / recomputed:.1f}x | {'yes' if same else 'NO'} |"
        )
    return "\n".join(lines)
