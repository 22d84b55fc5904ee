"""Training-throughput benchmark: step time, tokens/s, MFU, peak memory and the loss reached, per run.

Runs `scripts/train.py` for `steps` optimizer steps, once per entry of `runs` in each round, alternating
them (A B A B, since this kind of machine is noisy). Each run logs every step; the first `warmup` steps
(compilation, allocator and cache warm-up) are left out of the medians. Peak memory is the run's largest
RSS over all its processes on a CPU, the most CUDA memory allocated on a GPU. The loss is the val loss
after the last step, on the run's own evaluation windows: equal losses mean the runs computed alike.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from hydragpt.bench.runs import check_run, run_train, validate_runs
from hydragpt.config import PathsConfig, require, to_dataclass
from hydragpt.engine.metrics import peak_flops
from hydragpt.engine.system import resolve_device, resolve_dtype
from hydragpt.train_config import TrainConfig

log = logging.getLogger(__name__)
# What this benchmark gives every run, and the knob that sets it.
SETS = {
    "train.max_iters": "the benchmark's steps sets it",
    "train.max_tokens": "the benchmark's steps sets the run's length",
    "train.epochs": "the benchmark's steps sets the run's length",
    "train.log_interval": "the benchmark times every step",
    "train.eval_interval": "the benchmark evaluates after the last step",
}

LAST_STEPS = 20  # the training loss reported is the mean of these last steps'


@dataclass
class BenchTrainConfig:
    """scripts/bench_train.py: step time, tokens/s, MFU, peak memory and loss of training runs, alternated."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    # each run's train.py overrides, space-separated; the first is the baseline the others are compared with
    runs: list[str] = field(default_factory=lambda: ["experiment=tiny_cpu"])
    steps: int = 50  # optimizer steps per run
    warmup: int = 5  # first steps left out of the medians (compilation, allocator and caches)
    repeats: int = 2  # rounds, each running every run once
    work_dir: str = "${paths.output_dir}/bench_train"  # where the runs' directories and results.json go


@dataclass
class Measured:
    """One run's figures."""

    run: str
    round: int
    ms_per_step: float  # median over the steps after warmup
    tokens_per_sec: float
    mfu: float | None  # against `peak_tflops`
    peak_tflops: float | None  # the peak the MFU assumes (null: the device is not in the table)
    peak_memory_mib: float
    val_loss: float  # after the last step
    train_loss: float  # mean over the last LAST_STEPS steps (one step's loss is noisy)


def bench_train_config(cfg: DictConfig) -> BenchTrainConfig:
    typed = to_dataclass(cfg, BenchTrainConfig)
    validate_runs(typed.runs, """'runs=["experiment=tiny_cpu","experiment=tiny_cpu system.dtype=bfloat16"]'""")
    for key in ("steps", "repeats"):
        require(getattr(typed, key) >= 1, f"{key} must be >= 1, got {getattr(typed, key)}", "set a positive count")
    require(
        typed.warmup < typed.steps,
        f"warmup={typed.warmup} leaves none of the {typed.steps} steps to measure",
        f"use fewer warmup steps than steps, e.g. warmup=5 steps={max(typed.steps, 10)}",
    )
    return typed


def assumed_peak(cfg: TrainConfig) -> float | None:
    """The peak FLOP/s the run's MFU is computed against, as the run resolves its device and dtype."""
    device = resolve_device(cfg.system.device)
    return peak_flops(device, resolve_dtype(cfg.system.dtype, device), cfg.system.peak_flops)


def measure(run: str, round_: int, records: list[dict], warmup: int, peak_rss: int, peak: float | None) -> Measured:
    steps = [r for r in records if "dt_ms" in r and r["iter"] >= warmup]
    cuda_peak = [r["peak_memory_gib"] for r in steps if "peak_memory_gib" in r]
    mfus = [r["mfu"] for r in steps if r["mfu"] is not None]
    return Measured(
        run=run,
        round=round_,
        ms_per_step=statistics.median(r["dt_ms"] for r in steps),
        tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in steps),
        mfu=statistics.median(mfus) if mfus else None,
        peak_tflops=peak / 1e12 if peak else None,
        peak_memory_mib=max(cuda_peak) * 1024 if cuda_peak else peak_rss / 2**20,
        val_loss=[r for r in records if "val_loss" in r][-1]["val_loss"],
        train_loss=statistics.mean(r["loss"] for r in steps[-LAST_STEPS:]),
    )


def bench_train(cfg: BenchTrainConfig) -> str:
    """The comparison as Markdown; the figures also go to results.json in the runs' directory."""
    checked = {run: check_run(run, cfg.paths.data_dir, SETS) for run in cfg.runs}
    length = [f"train.max_iters={cfg.steps}", "train.log_interval=1", f"train.eval_interval={cfg.steps}"]
    work = Path(cfg.work_dir) / time.strftime("%Y-%m-%d_%H-%M-%S")
    done: list[Measured] = []
    for round_ in range(cfg.repeats):
        for index, run in enumerate(cfg.runs):
            overrides, composed = checked[run]
            records, seconds, peak_rss = run_train(
                run, [*overrides, *length], work / f"round{round_ + 1}/run{index + 1}"
            )
            done.append(measure(run, round_, records, cfg.warmup, peak_rss, assumed_peak(composed)))
            log.info("round %d, %s: %.0fs, %.1f ms/step", round_ + 1, run, seconds, done[-1].ms_per_step)
    (work / "results.json").write_text(json.dumps([asdict(m) for m in done], indent=2) + "\n")
    return report(cfg, done, work)


def _format_mfu(m: Measured) -> str:
    return "-" if m.mfu is None else f"{100 * m.mfu:.1f}% of {m.peak_tflops:.2f} TFLOP/s"


def report(cfg: BenchTrainConfig, done: list[Measured], work: Path) -> str:
    lines = [
        f"{cfg.steps} steps per run, medians over steps {cfg.warmup} to {cfg.steps - 1}; runs and results.json"
        f" in {work}",
        "",
        f"| round | run | ms/step | tokens/s | MFU | peak memory | train loss (last {LAST_STEPS} steps)"
        " | val loss after the last step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in done:
        lines.append(
            f"| {m.round + 1} | {m.run} | {m.ms_per_step:.1f} | {m.tokens_per_sec:,.0f} | {_format_mfu(m)}"
            f" | {m.peak_memory_mib:,.0f} MiB | {m.train_loss:.4f} | {m.val_loss:.4f} |"
        )
    baseline = statistics.median(m.tokens_per_sec for m in done if m.run == cfg.runs[0])
    lines += ["", f"| run | median tokens/s | vs {cfg.runs[0]} |", "|---|---|---|"]
    for run in cfg.runs:
        speed = statistics.median(m.tokens_per_sec for m in done if m.run == run)
        lines.append(f"| {run} | {speed:,.0f} | {speed / baseline:.2f}x |")
    return "\n".join(lines)


ConfigStore.instance().store(group="schema", name="bench_train", node=BenchTrainConfig)
