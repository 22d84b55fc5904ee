"""Metric loggers behind one interface: each gets every training and evaluation record.

A record is a flat dict with an `iter` key; training records carry `loss`, evaluation records
`val_loss`. The console (and so train.log, through Hydra's job logging) and `metrics.jsonl` in the run
directory are always on; the `logger` config group adds trackers (wandb, TensorBoard, CSV), several at
once when asked. Only rank 0 of a torchrun job builds any of them.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hydragpt.errors import UserError

METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"  # a sweep job's status, written by hydragpt.sweep: its presence marks a sweep job
log = logging.getLogger("hydragpt.train")


class MetricsLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self, failed: bool = False) -> None:
        """Called once at the end of the run, also when it fails (`failed`), so a tracker's run ends."""


class Tracker(Protocol):
    """An option of the `logger` group: its knobs, and the logger they build for a run."""

    def build(self, run: RunInfo) -> MetricsLogger: ...


@dataclass(frozen=True)
class RunInfo:
    """What trackers need to know about the run they record."""

    dir: Path  # the run directory
    name: str  # the run directory's path under paths.output_dir
    group: str | None  # the sweep's path under paths.output_dir, for the jobs of a multirun
    config: dict[str, Any]  # the resolved run config
    run_id: str  # stays the same when the run is resumed
    resumed_at: int | None  # the step a resumed run continues from


def run_info(run_dir: Path, output_dir: Path, config: dict[str, Any], run_id: str, resumed_at: int | None) -> RunInfo:
    """A sweep job's directory (one with a result.json) sits in the sweep's directory."""
    sweep_dir = run_dir.parent if (run_dir / RESULT_FILE).is_file() else None
    return RunInfo(
        dir=run_dir,
        name=_relative_name(run_dir, output_dir),
        group=_relative_name(sweep_dir, output_dir) if sweep_dir else None,
        config=config,
        run_id=run_id,
        resumed_at=resumed_at,
    )


def _relative_name(path: Path, root: Path) -> str:
    path, root = path.resolve(), root.resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else path.name


def tokens_per_sec(records: list[dict[str, Any]]) -> float | None:
    """The median tokens/s of a run's training records, without the first (its window warms up)."""
    speed = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]
    return statistics.median(speed) if speed else None


def is_suite_score(key: str) -> bool:
    """`suite/<name>` in an evaluation record, a suite's centred mean (`suite/<name>/<task>` is a task's)."""
    return key.startswith("suite/") and key.count("/") == 1


class ConsoleLogger:
    """One human-readable line per record, through `logging` (console and train.log)."""

    def log(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            hellaswag = (
                f", hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}" if "hellaswag_acc_norm" in record else ""
            )
            bpb = f" ({record['val_bpb']:.4f} bits per byte)" if "val_bpb" in record else ""
            suites = "".join(
                f", {key.removeprefix('suite/')} {value:.4f}" for key, value in record.items() if is_suite_score(key)
            )
            log.info(
                "eval at iter %d: train loss %.4f, val loss %.4f%s%s%s",
                record["iter"],
                record["train_loss"],
                record["val_loss"],
                bpb,
                hellaswag,
                suites,
            )
            return
        mfu = f", mfu {100 * record['mfu']:.2f}%" if record.get("mfu") is not None else ""
        memory = f", peak memory {record['peak_memory_gib']:.2f} GiB" if "peak_memory_gib" in record else ""
        log.info(
            "iter %d: loss %.4f, lr %.2e, grad norm %.3f, %.1f ms/iter, %s tok/s%s%s",
            record["iter"],
            record["loss"],
            record["lr"],
            record["grad_norm"],
            record["dt_ms"],
            f"{record['tokens_per_sec']:,.0f}",
            mfu,
            memory,
        )

    def close(self, failed: bool = False) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per record to metrics.jsonl; appending lets a resumed run continue it."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the whole run)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self, failed: bool = False) -> None:
        self._file.close()


def build_loggers(trackers: list[Tracker], run: RunInfo) -> list[MetricsLogger]:
    """Console and metrics.jsonl, then the configured trackers, those that may fail on the network (wandb)
    last. If one fails to start, those already started are closed again."""
    loggers: list[MetricsLogger] = [ConsoleLogger(), JsonlLogger(run.dir / METRICS_FILE)]
    try:
        for tracker in sorted(trackers, key=lambda t: getattr(t, "remote", False)):
            loggers.append(tracker.build(run))
    except BaseException:
        close_loggers(loggers, failed=True)
        raise
    return loggers


def close_loggers(loggers: list[MetricsLogger], failed: bool) -> None:
    """Close every logger, the last built (wandb) first, even if another fails to close: an unfinished
    wandb run would swallow the next sweep job's metrics. A close error is raised only after a run that
    otherwise succeeded; after a failed one, the run's own error is the one that matters."""
    errors = []
    for logger in reversed(loggers):
        try:
            logger.close(failed)
        except Exception as ex:
            log.warning("closing %s failed: %s", type(logger).__name__, ex)
            errors.append(ex)
    if errors and not failed:
        raise errors[0]


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop records past `step` (a resumed run's checkpoint): steps from `step` on and evaluations after
    it were made by the interrupted process and will be made again. Rewritten atomically."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    kept = [r for r in read_metrics(run_dir) if r["iter"] < step or ("val_loss" in r and r["iter"] == step)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found", "give a run directory written by scripts/train.py")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash or a full disk
            record = None
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
        elif line.strip("\x00 "):
            log.warning("%s:%d is not a metrics record; skipped", path, number)
    return records
