"""scripts/bench_train.py: its figures are the medians of what the runs recorded, and it refuses what it
would not measure as asked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hydragpt.bench.memory import run_measured, tree_rss_high_water
from hydragpt.bench.train import measure
from tests.helpers import run_script
from tests.test_errors import assert_user_error


def test_the_figures_are_medians_after_warmup_and_the_last_evaluation() -> None:
    records = [
        {"iter": 0, "val_loss": 4.0},
        *(
            {"iter": i, "loss": 3.0 - i / 10, "dt_ms": dt, "tokens_per_sec": 1000 / dt, "mfu": dt / 1000}
            for i, dt in enumerate([900.0, 10.0, 30.0, 20.0])
        ),
        {"iter": 4, "val_loss": 2.5},
    ]
    cpu = measure("a", 0, records, warmup=1, peak_rss=300 * 2**20, peak=2e12)
    assert (cpu.ms_per_step, cpu.tokens_per_sec, cpu.mfu) == (20.0, 50.0, 0.02)  # step 0 (900 ms) left out
    assert (cpu.peak_memory_mib, cpu.peak_tflops, cpu.val_loss) == (300, 2.0, 2.5)
    assert cpu.train_loss == pytest.approx((2.9 + 2.8 + 2.7) / 3)  # the mean of the last steps measured
    gpu = measure("a", 0, [{**r, "peak_memory_gib": 1.5} if "dt_ms" in r else r for r in records], 1, 300 * 2**20, None)
    assert (gpu.peak_memory_mib, gpu.peak_tflops) == (1536, None)  # CUDA's allocation, not the process's RSS


def test_a_runs_peak_memory_is_its_high_water_mark_read_cheaply() -> None:
    """A child that holds 300 MB for a moment, then frees it: the peak is read from the kernel's record."""
    holds = "import time; block = bytearray(300 * 2**20); time.sleep(1.5); del block; time.sleep(0.6)"
    result, _, (peak,) = run_measured([sys.executable, "-c", holds], tree_rss_high_water, interval=0.5)
    assert result.returncode == 0
    assert 300 * 2**20 <= peak < 600 * 2**20


def test_one_run_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    result = run_script(
        "bench_train",
        'runs=["experiment=debug"]',
        "steps=4",
        "warmup=1",
        "repeats=1",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    (work,) = (tmp_path / "bench_train").iterdir()
    (figures,) = json.loads((work / "results.json").read_text())
    records = [json.loads(line) for line in (work / "round1" / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "dt_ms" in r] == [0, 1, 2, 3]  # every step logged
    assert figures["val_loss"] == [r for r in records if "val_loss" in r][-1]["val_loss"]
    assert figures["peak_memory_mib"] > 100  # a Python process with torch
    row = f"| 1 | experiment=debug | {figures['ms_per_step']:.1f} | {figures['tokens_per_sec']:,.0f} |"
    assert row in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ['runs=["experiment=debug train.max_iters=9"]'],
            "run 'experiment=debug train.max_iters=9' sets train.max_iters",
        ),
        (["steps=5", "warmup=5"], "warmup=5 leaves none of the 5 steps to measure"),
    ],
)
def test_refusals(overrides: list[str], message: str, tmp_path: Path) -> None:
    result = run_script("bench_train", *overrides, f"paths.output_dir={tmp_path}")
    assert_user_error(result, message)
    assert not (tmp_path / "bench_train").exists()
