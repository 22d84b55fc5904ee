"""Multirun sweeps: one complete run directory per job, a summary row per job, failed jobs included."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from tests.helpers import DEBUG_RUN, run_script


def test_four_job_sweep_with_a_failing_job(data_dir: Path, tmp_path: Path) -> None:
    result = run_script(
        "train",
        "-m",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path}",
        "train.max_iters=10",
        "train.eval_interval=5",
        "optim.lr=1e-3,3e-4,-1,1e-4",  # job 2 is made to fail: a negative learning rate
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: optim.lr must be > 0, got -1.0 (e.g. optim.lr=6e-4)"]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    for job in jobs:
        assert (sweep / job / ".hydra" / "config.yaml").is_file() and (sweep / job / "train.log").is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "optim.lr=0.001", "completed"),
        ("1", "optim.lr=0.0003", "completed"),
        ("2", "optim.lr=-1", "failed"),
        ("3", "optim.lr=0.0001", "completed"),
    ]
    assert rows[2]["error"].startswith("optim.lr must be > 0") and rows[2]["best_val_loss"] == ""
    for row in (rows[0], rows[1], rows[3]):
        assert (
            0 < float(row["best_val_loss"]) <= float(row["final_val_loss"]) < 4.5 and float(row["tokens_per_sec"]) > 0
        )
        assert float(row["final_val_bpb"]) == pytest.approx(float(row["final_val_loss"]) / math.log(2), rel=1e-6)
        assert (sweep / row["job"] / "checkpoints" / "last.pt").is_file()
    markdown = (sweep / "summary.md").read_text().splitlines()
    assert len(markdown) == 2 + 4 and "| 2 | optim.lr=-1 | failed |" in markdown[4]

    plotted = run_script("plot", f"sweep={sweep}")
    assert plotted.returncode == 0, plotted.stderr

    reported = run_script("report", f"run={sweep}")
    assert reported.returncode == 0, reported.stderr
    report = (sweep / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[:3] for line in table] == [
        ["| 0", "optim.lr=0.001", "completed"],
        ["| 1", "optim.lr=0.0003", "completed"],
        ["| 2", "optim.lr=-1", "failed"],
        ["| 3", "optim.lr=0.0001", "completed"],
    ]
    for line, row in zip(table, rows, strict=True):
        if row["status"] == "completed":
            assert f"| {float(row['final_val_loss']):.4f} | {float(row['best_val_loss']):.4f} |" in line
    assert "![every job's val loss](val_loss.png)" in report
    assert (sweep / "val_loss.png").stat().st_size > 10_000


def test_plot_needs_a_run_or_a_sweep(tmp_path: Path) -> None:
    result = run_script("plot", f"sweep={tmp_path}")
    assert result.returncode == 2 and "holds no finished sweep jobs" in result.stderr


def test_sweep_jobs_with_two_ranks_each(data_dir: Path, tmp_path: Path) -> None:
    """hydra/launcher=torchrun: each job is a 2-rank gloo job in its own directory; a failed job is a row.
    The jobs see what the sweep's command line gave: an extra config directory, Hydra settings."""
    extra = tmp_path / "extra" / "experiment"
    extra.mkdir(parents=True)
    (extra / "quick.yaml").write_text("# @package _global_\ntrain:\n  max_iters: 6\n  eval_interval: 3\n")
    outputs = tmp_path / "outputs"
    result = run_script(
        "train",
        "-m",
        f"--config-dir={extra.parent}",
        "hydra/launcher=torchrun",
        "hydra.launcher.nproc_per_node=2",
        "hydra.job.chdir=true",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={outputs}",
        "experiment=quick",
        "optim.lr=1e-2,-1",
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: job 1 failed: optim.lr must be > 0, got -1.0")
    (sweep,) = (outputs / "multirun").glob("*/*")
    assert sorted(p.name for p in outputs.iterdir()) == ["multirun"]  # no stray per-rank directories
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    log = (sweep / "0" / "train.log").read_text()
    assert "x 2 ranks" in log and "[rank 1]" not in log and "training from iter 0 to 6" in log
    assert (sweep / "0" / "checkpoints" / "last.pt").is_file() and (sweep / "0" / ".hydra" / "config.yaml").is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "optim.lr=0.01", "completed"),
        ("1", "optim.lr=-1", "failed"),
    ]
    assert 0 < float(rows[0]["best_val_loss"]) < 4.5
    assert rows[1]["error"].startswith("job 1 failed: optim.lr must be > 0")


def test_optuna_search_minimizes_the_best_val_loss(data_dir: Path, tmp_path: Path) -> None:
    result = run_script(
        "train",
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path}",
        "train.max_iters=6",
        "train.eval_interval=3",
    )
    assert result.returncode == 0, result.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed"] * 3
    for row in rows:  # the sampled values of the search space, and nothing else
        assert [o.split("=")[0] for o in row["overrides"].split()] == [
            "optim.lr",
            "optim.weight_decay",
            "model.dropout",
        ]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(float(r["best_val_loss"]) for r in rows), rel=1e-4)


def test_a_sweep_with_a_value_of_the_wrong_type_makes_no_directory(data_dir: Path, tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    result = run_script(
        "train",
        "-m",
        "experiment=debug",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={outputs}",
        "optim.lr=1e-3,abc",
        "train.max_iters=2",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: job 1 (") and "Value 'abc' of type 'str' could not be converted to Float" in line
    assert not outputs.exists()
