"""Metric loggers behind one interface: each gets every training and evaluation record.

A record is a flat dict with an `iter` key; training records carry `loss`, evaluation records
`val_loss`. The `default` logger is the console (and so train.log, through Hydra's job logging) plus
`metrics.jsonl` in the run directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from hydragpt.config import LoggerConfig
from hydragpt.errors import UserError

METRICS_FILE = "metrics.jsonl"
log = logging.getLogger("hydragpt.train")


class MetricsLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class ConsoleLogger:
    """One human-readable line per record, through `logging` (console and train.log)."""

    def log(self, record: dict[str, Any]) -> None:
        if "val_loss" in record:
            log.info(
                "eval at iter %d: train loss %.4f, val loss %.4f",
                record["iter"],
                record["train_loss"],
                record["val_loss"],
            )
            return
        mfu = f", mfu {100 * record['mfu']:.2f}%" if record.get("mfu") is not None else ""
        log.info(
            "iter %d: loss %.4f, lr %.2e, grad norm %.3f, %.1f ms/iter, %s tok/s%s",
            record["iter"],
            record["loss"],
            record["lr"],
            record["grad_norm"],
            record["dt_ms"],
            f"{record['tokens_per_sec']:,.0f}",
            mfu,
        )

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per record to metrics.jsonl; appending lets a resumed run continue it."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the whole run)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def build_loggers(cfg: LoggerConfig, run_dir: Path) -> list[MetricsLogger]:
    if cfg.name != "default":
        raise UserError(f"unknown logger '{cfg.name}'", "use logger=default")
    return [ConsoleLogger(), JsonlLogger(run_dir / METRICS_FILE)]


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
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash or a full disk
            if line.strip("\x00 "):
                log.warning("%s:%d is not valid JSON; skipped", path, number)
    return records
