"""What the training benchmarks share: a run is `scripts/train.py` with a string of overrides, checked
before anything trains, started as a user would, and read back from the records it writes."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose

from hydragpt.bench.memory import last_error, run_measured, tree_rss_high_water
from hydragpt.config import require
from hydragpt.errors import UserError
from hydragpt.loggers import read_metrics
from hydragpt.train_config import TrainConfig, train_config

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


# What every benchmark gives every run, and the knob that sets it.
COMMON_SETS = {
    "paths.data_dir": "the benchmark's paths.data_dir sets it",
    "hydra.run.dir": "the benchmark's work_dir holds the runs",
    "train.plot": "the benchmark draws no plots",
}


def validate_runs(runs: list[str], example: str) -> None:
    """At least one run, each listed once (`example`: a valid list, for the fix)."""
    require(len(runs) >= 1, "runs must list at least one run", f"e.g. {example}")
    require(len(set(runs)) == len(runs), "runs lists the same run twice", f"list each once, e.g. {example}")


def check_run(run: str, data_dir: str, sets: dict[str, str]) -> tuple[list[str], TrainConfig]:
    """The run's train.py overrides (on `data_dir`, without plots) and its typed config. A key the
    benchmark sets for every run (`sets`: key -> the benchmark knob that sets it) or an override that
    does not compose is refused here, before any run has trained."""
    fixed = {**sets, **COMMON_SETS}
    for key in (override.split("=", 1)[0] for override in run.split()):
        if key in fixed:
            raise UserError(
                f"run '{run}' sets {key}, which the benchmark sets for every run", f"drop it from the run; {fixed[key]}"
            )
    overrides = [*run.split(), f"paths.data_dir={data_dir}", "train.plot=false"]
    try:
        return overrides, train_config(compose(config_name="train", overrides=overrides))
    except UserError as ex:
        raise UserError(f"run '{run}': {ex.what}", ex.fix) from ex


def run_train(label: str, arguments: list[str], run_dir: Path) -> tuple[list[dict], float, int]:
    """One run of train.py; its metrics records, wall seconds and the peak RSS of its processes (bytes)."""
    command = [sys.executable, str(SCRIPTS / "train.py"), *arguments, f"hydra.run.dir={run_dir}"]
    result, seconds, (peak_rss,) = run_measured(command, tree_rss_high_water, interval=0.5)
    if result.returncode != 0:
        raise UserError(f"run '{label}' failed: {last_error(result)}", f"see {run_dir}/train.log, or run it alone")
    return read_metrics(run_dir), seconds, peak_rss
