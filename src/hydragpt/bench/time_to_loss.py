"""Time-to-loss benchmark: how long each of several training runs takes to reach a target val loss.

Runs `scripts/train.py` as a user would, once per entry of `runs` in each round, alternating them (A B A B,
since this kind of machine is noisy), on the same data and evaluating the same validation windows every
`eval_interval` steps. Each run's time to the target is the `train_seconds` of its first evaluation record
at or below the target: training time only, so how often the benchmark evaluates does not count.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from hydragpt.bench.runs import check_run, run_train, validate_runs
from hydragpt.config import PathsConfig, require, to_dataclass

# Optional[...] rather than `X | None`: OmegaConf reads these annotations when the config is composed.
# ruff: noqa: UP045

log = logging.getLogger(__name__)
# What this benchmark gives every run, so that all are measured alike, and the knob that sets it.
SETS = {
    "train.eval_interval": "the benchmark's eval_interval sets it",
    "train.eval_iters": "the benchmark's eval_windows sets it",
}


@dataclass
class BenchTimeToLossConfig:
    """scripts/bench_time_to_loss.py: wall time to a target val loss of several training runs, alternated."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    # each run's train.py overrides, space-separated; the first is the baseline the others are compared with
    runs: list[str] = field(default_factory=lambda: ["experiment=tiny_cpu", "experiment=speedrun_cpu"])
    target: float = 1.886  # the val loss to reach
    repeats: int = 2  # rounds, each running every run once
    eval_interval: int = 50  # steps between evaluations: the resolution of the time to the target
    eval_windows: int = 240  # val windows per evaluation, the same for every run (a multiple of each batch size)
    work_dir: str = "${paths.output_dir}/bench_time_to_loss"  # where the runs' directories go, one per run and round
    budget: Optional[float] = None  # also each run's val loss by this many training seconds (null: baseline's median)


@dataclass
class Run:
    """One finished training run, from its evaluation records."""

    label: str
    round: int
    evaluations: list[dict]  # iter, val_loss, train_seconds

    def reached(self, target: float) -> dict | None:
        """The first evaluation at or below `target` (None: never)."""
        return next((e for e in self.evaluations if e["val_loss"] <= target), None)

    def seconds_to(self, target: float) -> float | None:
        hit = self.reached(target)
        return hit["train_seconds"] if hit else None

    def val_loss_by(self, seconds: float) -> float:
        """The val loss of its last evaluation within `seconds` of training (its final one if it ended sooner)."""
        return [e for e in self.evaluations if e["train_seconds"] <= seconds][-1]["val_loss"]

    @property
    def seconds(self) -> float:
        return self.evaluations[-1]["train_seconds"]


def bench_time_to_loss_config(cfg: DictConfig) -> BenchTimeToLossConfig:
    typed = to_dataclass(cfg, BenchTimeToLossConfig)
    validate_runs(typed.runs, """'runs=["experiment=tiny_cpu","experiment=speedrun_cpu"]'""")
    for key in ("repeats", "eval_interval", "eval_windows"):
        require(getattr(typed, key) >= 1, f"{key} must be >= 1, got {getattr(typed, key)}", "set a positive count")
    require(typed.target > 0, f"target must be > 0, got {typed.target}", "a val loss, e.g. target=1.886")
    require(typed.budget is None or typed.budget > 0, f"budget must be > 0, got {typed.budget}", "or null")
    return typed


def train_arguments(run: str, cfg: BenchTimeToLossConfig) -> list[str]:
    """The run's train.py overrides with the benchmark's evaluation, once they are known to compose."""
    overrides, composed = check_run(run, cfg.paths.data_dir, SETS)
    batch = composed.train.batch_size
    require(
        batch != "auto",
        f"run '{run}' sets train.batch_size=auto, so which windows it evaluates is known only once it runs",
        "give each run's train.batch_size as a number",
    )
    require(
        cfg.eval_windows % batch == 0,
        f"eval_windows={cfg.eval_windows} is not a multiple of run '{run}''s train.batch_size={batch}",
        "every run must evaluate the same windows: choose a multiple of each run's batch size, e.g. 240",
    )
    return [*overrides, f"train.eval_interval={cfg.eval_interval}", f"train.eval_iters={cfg.eval_windows // batch}"]


def train_once(label: str, round_: int, arguments: list[str], run_dir: Path) -> Run:
    """One run, as its evaluations."""
    records, seconds, _ = run_train(label, arguments, run_dir)
    evaluations = [{key: r[key] for key in ("iter", "val_loss", "train_seconds")} for r in records if "val_loss" in r]
    log.info("round %d, %s: %.0fs (%.0fs training)", round_ + 1, label, seconds, evaluations[-1]["train_seconds"])
    return Run(label, round_, evaluations)


def bench_time_to_loss(cfg: BenchTimeToLossConfig) -> str:
    """The comparison as Markdown."""
    arguments = {run: train_arguments(run, cfg) for run in cfg.runs}
    work = Path(cfg.work_dir) / time.strftime("%Y-%m-%d_%H-%M-%S")
    done: list[Run] = []
    for round_ in range(cfg.repeats):
        for index, run in enumerate(cfg.runs):
            done.append(train_once(run, round_, arguments[run], work / f"round{round_ + 1}" / f"run{index + 1}"))
    return report(cfg, done, work)


def _median(values: list[float | None]) -> float | None:
    """The median, or None when some run never got there (a median over misses would hide them)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


def report(cfg: BenchTimeToLossConfig, done: list[Run], work: Path) -> str:
    baseline = cfg.runs[0]
    by_run = {run: [r for r in done if r.label == run] for run in cfg.runs}
    budget = cfg.budget or statistics.median(r.seconds for r in by_run[baseline])
    lines = [
        f"time to val loss <= {cfg.target} (training seconds, evaluations every {cfg.eval_interval} steps on the"
        f" same {cfg.eval_windows} val windows); runs in {work}",
        "",
        "| round | run | steps to target | seconds to target | training seconds | final val loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in done:
        hit = r.reached(cfg.target)
        steps, seconds = (str(hit["iter"]), f"{hit['train_seconds']:.1f}") if hit else ("not reached", "-")
        final = r.evaluations[-1]["val_loss"]
        lines.append(f"| {r.round + 1} | {r.label} | {steps} | {seconds} | {r.seconds:.1f} | {final:.4f} |")
    lines += [
        "",
        f"| run | median seconds to target | time vs {baseline} | val loss by {budget:.0f} training seconds |",
        "|---|---|---|---|",
    ]
    base = _median([r.seconds_to(cfg.target) for r in by_run[baseline]])
    for run, runs in by_run.items():
        median = _median([r.seconds_to(cfg.target) for r in runs])
        by_budget = statistics.median(r.val_loss_by(budget) for r in runs)
        lines.append(
            f"| {run} | {'not reached' if median is None else f'{median:.1f}'}"
            f" | {'-' if median is None or not base else f'{median / base:.2f}x'}"
            f" | {by_budget:.4f} |"
        )
    return "\n".join(lines)


ConfigStore.instance().store(group="schema", name="bench_time_to_loss", node=BenchTimeToLossConfig)
