"""Sweep summaries: after every job of a multirun, `summary.csv` and `summary.md` at the sweep root.

Each job leaves `result.json` in its own directory (status, overrides, wall time, error); the summary is
rebuilt from all of them, so it is complete whichever launcher ran the jobs (in this process, in a pool,
on a cluster) and stays readable if the sweep is stopped half way.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from hydragpt.engine.distributed import launched_env
from hydragpt.errors import UserError
from hydragpt.loggers import METRICS_FILE, RESULT_FILE, read_metrics, tokens_per_sec

SWEPT_FILE = "swept_keys.json"  # at the sweep root: the keys its jobs vary

COLUMNS = (
    "job",
    "overrides",
    "status",
    "final_val_loss",
    "best_val_loss",
    "final_val_bpb",
    "tokens_per_sec",
    "wall_s",
    "error",
)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []


def _best(val: list[float]) -> float | None:
    return min((v for v in val if math.isfinite(v)), default=val[-1] if val else None)


def best_val_loss(run_dir: Path) -> float | None:
    """The lowest val loss a run recorded (what a sweeper minimizes), None before its first evaluation."""
    return _best([r["val_loss"] for r in _records(run_dir) if "val_loss" in r])


def job_row(run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    """One summary row: the job's result.json plus what its metrics.jsonl says about the losses and speed."""
    records = _records(run_dir)
    val = [r["val_loss"] for r in records if "val_loss" in r]
    bpb = [r["val_bpb"] for r in records if "val_bpb" in r]
    return {
        **result,
        "final_val_loss": val[-1] if val else None,
        "best_val_loss": _best(val),
        "final_val_bpb": bpb[-1] if bpb else None,
        "tokens_per_sec": tokens_per_sec(records),
    }


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """A row per started job, in job order; `overrides` keeps only the swept keys' values."""
    results = []
    for path in sweep_dir.glob(f"*/{RESULT_FILE}"):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:  # being written right now by another job
            continue
        if not (isinstance(result, dict) and isinstance(result.get("job"), int) and "overrides" in result):
            raise UserError(f"{path} is not a sweep job's record", "give the root directory of a hydragpt sweep")
        results.append((path.parent, result))
    rows = [job_row(run_dir, result) for run_dir, result in sorted(results, key=lambda item: item[1]["job"])]
    swept = _swept_keys(sweep_dir)
    for row in rows:
        row["overrides"] = " ".join(o for o in row["overrides"] if swept is None or override_key(o) in swept)
    return rows


def override_key(override: str) -> str:
    """`optim.lr` of `optim.lr=1e-3` (and of `+optim.lr=...`, `~optim.lr`)."""
    return override.split("=", 1)[0].lstrip("+~")


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """The keys the sweep varies, as recorded when it started (None for a sweep without that record)."""
    try:
        return set(json.loads((sweep_dir / SWEPT_FILE).read_text()))
    except (OSError, json.JSONDecodeError):
        return None  # show every override


FORMATS = {
    "final_val_loss": "{:.4f}",
    "best_val_loss": "{:.4f}",
    "final_val_bpb": "{:.4f}",
    "tokens_per_sec": "{:,.0f}",
    "wall_s": "{:.1f}",
}


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    text = FORMATS[key].format(value) if key in FORMATS and math.isfinite(value) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def write_summary(sweep_dir: Path) -> None:
    """(Re)write summary.csv and summary.md from every job's result; jobs finishing together take turns."""
    with open(sweep_dir / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_summary(sweep_dir)


def _write_summary(sweep_dir: Path) -> None:
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
    """Registered in conf/hydra/default.yaml; does nothing outside a multirun, or on ranks other than 0.

    A job's row appears when it starts (status running), so a job killed half way still has one.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Record the keys the sweep varies: those swept on the command line (`optim.lr=1e-3,3e-4`, or
        Optuna's `model.n_layer=choice(4,6)`) and those of the sweeper's own search space
        (`hydra.sweeper.params`). The jobs' overrides only show the values each one got."""
        hydra = config.hydra
        parsed = OverridesParser.create().parse_overrides(list(hydra.overrides.task))
        swept = [o.key_or_group for o in parsed if o.is_sweep_override()]
        swept += [key for key in hydra.sweeper.get("params") or {} if key not in swept]
        sweep_dir = Path(hydra.sweep.dir)  # the sweeper reads the same timestamp: ${now:} is cached
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEPT_FILE).write_text(json.dumps(swept) + "\n")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start = time.perf_counter()
        hydra = config.hydra
        if hydra.mode == RunMode.MULTIRUN and launched_env().is_main:
            self._record(hydra, {"status": "running", "wall_s": None, "error": ""})

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra = job_return.hydra_cfg.hydra if job_return.hydra_cfg else None
        if hydra is None or hydra.mode != RunMode.MULTIRUN or not launched_env().is_main:
            return
        failed = job_return.status == JobStatus.FAILED
        error = job_return._return_value if failed else None
        result = {
            "status": "failed" if failed else "completed",
            "wall_s": round(time.perf_counter() - self._start, 1),
            "error": (str(error) or type(error).__name__) if failed else "",
        }
        self._record(hydra, result)

    def _record(self, hydra: DictConfig, result: dict[str, Any]) -> None:
        run_dir = Path(hydra.runtime.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        result = {"job": int(hydra.job.num), "overrides": list(hydra.overrides.task), **result}
        tmp = run_dir / f".{RESULT_FILE}.tmp"
        tmp.write_text(json.dumps(result) + "\n")
        os.replace(tmp, run_dir / RESULT_FILE)
        write_summary(run_dir.parent)  # hydra.sweep.dir itself would re-evaluate its ${now:} timestamp
