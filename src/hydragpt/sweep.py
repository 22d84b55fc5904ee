"""Sweep summaries: after every job of a multirun, `summary.csv` and `summary.md` at the sweep root.

Each job leaves `result.json` in its own directory (status, overrides, wall time, error); the summary is
rebuilt from all of them, so it is complete whichever launcher ran the jobs (in this process, in a pool,
on a cluster) and stays readable if the sweep is stopped half way.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from hydragpt.engine.distributed import launched_env
from hydragpt.loggers import METRICS_FILE, read_metrics

RESULT_FILE = "result.json"
COLUMNS = ("job", "overrides", "status", "final_val_loss", "best_val_loss", "tokens_per_sec", "wall_s", "error")


def job_row(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """One summary row: the job's result.json plus what its metrics.jsonl says about the losses and speed."""
    records = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    val = [r["val_loss"] for r in records if "val_loss" in r]
    speed = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]  # the first window warms up
    return {
        **result,
        "final_val_loss": val[-1] if val else None,
        "best_val_loss": min(val) if val else None,
        "tokens_per_sec": statistics.median(speed) if speed else None,
    }


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """A row per finished job, in job order; `overrides` keeps only what differs between the jobs."""
    results = []
    for path in sweep_dir.glob(f"*/{RESULT_FILE}"):
        try:
            results.append((path.parent, json.loads(path.read_text())))
        except json.JSONDecodeError:  # being written right now by another job
            continue
    rows = [job_row(run_dir, result) for run_dir, result in sorted(results, key=lambda item: item[1]["job"])]
    for row, overrides in zip(rows, _varying(rows), strict=True):
        row["overrides"] = overrides
    return rows


FORMATS = {"final_val_loss": "{:.4f}", "best_val_loss": "{:.4f}", "tokens_per_sec": "{:,.0f}", "wall_s": "{:.1f}"}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    text = FORMATS[key].format(value) if key in FORMATS and math.isfinite(value) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's overrides without those every job shares: what the sweep changed."""
    split = [row["overrides"].split() for row in rows]
    shared = set.intersection(*map(set, split)) if len(split) > 1 else set()
    return [" ".join(o for o in overrides if o not in shared) for overrides in split]


def write_summary(sweep_dir: Path) -> None:
    """(Re)write summary.csv and summary.md from every finished job's result."""
    rows = sweep_rows(sweep_dir)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row.get(k) for k in COLUMNS} for row in rows)
    markdown = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"]
    markdown += ["| " + " | ".join(_cell(k, row.get(k)) for k in COLUMNS) + " |" for row in rows]
    for name, text in (("summary.csv", table.getvalue()), ("summary.md", "\n".join(markdown) + "\n")):
        tmp = sweep_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, sweep_dir / name)


class SweepSummaryCallback(Callback):
    """Registered in conf/hydra/default.yaml; does nothing outside a multirun, or on ranks other than 0."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra = job_return.hydra_cfg.hydra if job_return.hydra_cfg else None
        if hydra is None or hydra.mode != RunMode.MULTIRUN or not launched_env().is_main:
            return
        failed = job_return.status == JobStatus.FAILED
        result = {
            "job": int(hydra.job.num),
            "overrides": " ".join(job_return.overrides or []),
            "status": "failed" if failed else "completed",
            "wall_s": round(time.perf_counter() - getattr(self, "_start", time.perf_counter()), 1),
            "error": str(job_return._return_value) if failed else "",
        }
        run_dir = Path(hydra.runtime.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULT_FILE).write_text(json.dumps(result) + "\n")
        write_summary(run_dir.parent)  # hydra.sweep.dir itself would re-evaluate its ${now:} timestamp
