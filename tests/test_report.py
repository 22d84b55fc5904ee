"""scripts/report.py and the report training writes at its end: its numbers against metrics.jsonl."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from hydragpt.loggers import read_metrics
from hydragpt.model import GPT, GPTConfig
from tests.helpers import run_script


def summary_rows(report: str) -> dict[str, str]:
    """The Summary section's table as {what: value}."""
    section = report.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("|")][2:]
    return {what: value for what, value in rows}


def test_a_finished_run_reports_what_its_metrics_say(train_run, tmp_path: Path) -> None:
    result = train_run("train.max_iters=6", "train.eval_interval=3", "train.report=true")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    report = (run / "report.md").read_text()
    assert f"report: {run / 'report.md'}" in result.stdout
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r and "val_loss" not in r]
    evals = [r for r in records if "val_loss" in r]
    rows = summary_rows(report)
    model = GPT(GPTConfig(**torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model_config"]))
    assert report.splitlines()[2] == "**Finished**: 6 steps."
    assert rows["parameters"] == f"{model.num_params():,}"
    assert rows["steps"] == "6" and rows["tokens"] == f"{steps[-1]['tokens_seen']:,}"
    assert rows["tokens/s (median)"] == f"{statistics.median(r['tokens_per_sec'] for r in steps[1:]):,.0f}"
    assert rows["MFU (median)"] == f"{100 * statistics.median(r['mfu'] for r in steps[1:]):.1f}%"
    assert rows["final val loss"] == f"{evals[-1]['val_loss']:.4f}"
    assert rows["best val loss"] == f"{min(r['val_loss'] for r in evals):.4f}"
    assert rows["final val bits per byte"] == f"{evals[-1]['val_bpb']:.4f}"
    evaluations = report.split("## Evaluations", 1)[1].split("\n## ", 1)[0]
    for r in evals:  # every evaluation, a row each
        expected = f"| {r['iter']} | {r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} |"
        assert expected in evaluations
    assert "| 1 | float32 |" in report and torch.__version__ in report  # one process: its hardware, software
    assert report.count("sample ") == 2 and "(no plot yet: `python scripts/plot.py" in report
    assert "Command-line overrides: `model=debug system=cpu" in report and "train.max_iters=6" in report

    again = run_script("report", f"run={run}", "samples=0")  # the script draws the missing plot first
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(run / "report.md") and (run / "plots" / "metrics.png").is_file()
    redone = (run / "report.md").read_text()
    assert "![loss, learning rate" in redone and "sample 1" not in redone and "## Samples\n\n(none)" in redone
    assert summary_rows(redone) == rows


def test_report_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    missing = run_script("report", f"run={tmp_path / 'nothing'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: run={tmp_path / 'nothing'} is not a directory")
    empty = run_script("report", f"run={tmp_path}")
    assert empty.returncode == 2 and f"error: {tmp_path / 'metrics.jsonl'} not found" in empty.stderr


def test_wall_time_adds_each_process_of_a_resumed_run() -> None:
    """Records in file order; a resume keeps the first process's evaluation at the step it resumes from,
    and the second process counts its time from its own start."""
    from hydragpt.report import wall_seconds

    first = [{"iter": 0, "time": 1.0}, {"iter": 1, "time": 5.0}, {"iter": 2, "time": 9.0}]
    second = [{"iter": 2, "time": 0.5}, {"iter": 3, "time": 4.0}, {"iter": 4, "time": 7.5}]
    assert wall_seconds(first + second) == 9.0 + 7.5
    assert wall_seconds(first) == 9.0 and wall_seconds([]) == 0.0
