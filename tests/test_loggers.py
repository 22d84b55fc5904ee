"""Trackers: wandb (offline, read back from its run files), TensorBoard and CSV, alone and together."""

from __future__ import annotations

import csv
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hydragpt.loggers import read_metrics
from tests.helpers import DEBUG_RUN, REPO, run_script
from tests.wandb_records import offline_runs


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No server, no key: wandb writes its runs to disk; its own caches stay out of the home directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def training_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_every_tracker_at_once_and_resume(train_run, tmp_path: Path, wandb_offline: None) -> None:
    """Train to 4, go on to 6, then resume from the checkpoint at 4 again (as if the process had died just
    before saving at 6): every tracker ends up with each step once, as an uninterrupted run would."""
    run = tmp_path / "outputs" / "run"
    common = ("logger=many", "train.eval_interval=4", "logger.wandb.tags=[test]")
    assert train_run(*common, "train.max_iters=4", run_dir=run).returncode == 0
    at_4 = (run / "checkpoints" / "last.pt").read_bytes()
    assert train_run(*common, f"resume={run}", "train.max_iters=6", run_dir=run).returncode == 0
    (run / "checkpoints" / "last.pt").write_bytes(at_4)
    result = train_run(*common, f"resume={run}", "train.max_iters=8", run_dir=run)
    assert result.returncode == 0, result.stderr
    jsonl = read_metrics(run)
    assert [r["iter"] for r in training_records(run)] == list(range(8))

    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in rows] == [r["iter"] for r in jsonl]
    assert [float(r["val_loss"]) for r in rows if r["val_loss"]] == [r["val_loss"] for r in jsonl if "val_loss" in r]
    assert [float(r["loss"]) for r in rows if r["loss"]] == [r["loss"] for r in training_records(run)]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["iter"], pytest.approx(r["loss"])) for r in training_records(run)
    ]
    assert [e.step for e in events.Scalars("eval/val_loss")] == [0, 4, 8]

    first, second, third = offline_runs(run)  # every process continues the same wandb run
    assert first.run_id == second.run_id == third.run_id and len(first.run_id) == 16
    assert first.name == third.name == "run" and first.group == ""
    assert first.config["model"]["n_layer"] == 2 and first.config["logger"]["wandb"]["tags"] == ["test"]
    last_logged = {r["iter"]: r["loss"] for r in first.history + second.history + third.history if "loss" in r}
    assert last_logged == {r["iter"]: r["loss"] for r in training_records(run)}  # by iter, the last one counts
    assert first.exit_code == second.exit_code == third.exit_code == 0


def test_one_offline_wandb_run_per_sweep_job(data_dir: Path, tmp_path: Path, wandb_offline: None) -> None:
    """Acceptance: each job gets its own wandb run with its own metrics, the sweep as group; a job that
    fails still finishes its wandb run (exit code 1) and the next job starts a fresh one."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "from hydragpt.engine import trainer\n"
        "step = trainer.Trainer.train_step\n"
        "def failing(self):\n"
        "    if self.optimizers[0].param_groups[0]['initial_lr'] == 2e-3 and self.step == 3:\n"
        "        raise RuntimeError('injected failure')\n"
        "    return step(self)\n"
        "trainer.Trainer.train_step = failing\n"
    )
    result = run_script(
        "train",
        "-m",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "logger=wandb",
        "train.max_iters=6",
        "train.eval_interval=3",
        "optim.lr=1e-2,2e-3,5e-3",  # job 1 fails at iteration 3
        env={**os.environ, "PYTHONPATH": str(inject)},
    )
    assert result.returncode != 0 and "injected failure" in result.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    group = str(sweep.relative_to(tmp_path / "outputs"))
    seen_ids = set()
    for job, lr in (("0", 1e-2), ("1", 2e-3), ("2", 5e-3)):
        (run,) = offline_runs(sweep / job)
        assert run.group == group and run.name == f"{group}/{job}" and run.config["optim"]["lr"] == lr
        assert run.exit_code == (1 if job == "1" else 0)
        losses = [(r["iter"], r["loss"]) for r in run.history if "loss" in r]
        assert losses == [(r["iter"], r["loss"]) for r in training_records(sweep / job)]
        assert [r["iter"] for r in run.history if "val_loss" in r] == ([0, 3] if job == "1" else [0, 3, 6])
        seen_ids.add(run.run_id)
    assert len(seen_ids) == 3
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]


def test_wandb_online_without_a_key_fails_fast(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wandb_offline: None
) -> None:
    """No key, and a terminal as stdin where wandb would ask for one: one error line at once, no prompt."""
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_MODE")
    terminal, _ = pty.openpty()
    overrides = [f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", "train.max_iters=2"]
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), *DEBUG_RUN, *overrides, "logger=wandb"],
        stdin=terminal,
        capture_output=True,
        text=True,
        timeout=60,  # a prompt would wait for ever
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: logger=wandb is online but wandb has no API key (run `wandb login` or set WANDB_API_KEY, or log"
        " locally with logger.wandb.mode=offline)"
    ]


def test_bad_wandb_mode_is_refused(train_run) -> None:
    result = train_run("logger=wandb", "logger.wandb.mode=sometimes")
    assert result.returncode == 2
    assert "unknown logger.wandb.mode 'sometimes' (use one of: online, offline, disabled)" in result.stderr


def test_csv_grows_columns_and_starts_from_the_jsonl(tmp_path: Path) -> None:
    from hydragpt.loggers.csv_logger import CsvLogger

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iter": 0, "train_loss": 4.0, "val_loss": 4.1}) + "\n")
    logger = CsvLogger(tmp_path / "metrics.csv", tmp_path)
    logger.log({"iter": 0, "loss": 3.9, "lr": 0.1})
    logger.log({"iter": 1, "loss": 3.5, "lr": 0.1})
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iter", "train_loss", "val_loss", "loss", "lr"]
    assert [(r["iter"], r["val_loss"], r["loss"]) for r in rows] == [
        ("0", "4.1", ""),
        ("0", "", "3.9"),
        ("1", "", "3.5"),
    ]


def test_resume_with_the_original_list_of_loggers(train_run, tmp_path: Path) -> None:
    """The original command line plus resume= works when it picked several loggers (a list choice)."""
    run = tmp_path / "run"
    assert train_run("logger=[tensorboard,csv]", "train.max_iters=2", "train.eval_interval=2").returncode == 0
    result = train_run("logger=[tensorboard,csv]", f"resume={run}", "train.max_iters=4", "train.eval_interval=2")
    assert result.returncode == 0, result.stderr
    assert [r["iter"] for r in training_records(run)] == [0, 1, 2, 3]
