"""The speedrun recipes compose as documented and train; the time-to-loss benchmark reads what runs record."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hydragpt.bench.time_to_loss import BenchTimeToLossConfig, Run, report
from hydragpt.engine.checkpoint import load_checkpoint
from hydragpt.engine.optim import Muon
from hydragpt.engine.schedule import WarmupStableDecay
from hydragpt.train_config import grad_accum_steps, train_config
from tests.helpers import compose_config, prepare_dataset, run_script
from tests.test_errors import assert_user_error


def test_speedrun_gpt2_has_the_records_settings() -> None:
    cfg = train_config(compose_config("train", ["experiment=speedrun_gpt2"]))
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size) == (12, 768, 6, 1024, 50304)
    assert (m.positions, m.activation, m.qk_norm, m.tie_embeddings, m.zero_init_proj) == (
        "rope",
        "relu2",
        True,
        False,
        True,
    )
    assert (t.max_iters, t.total_batch_size, t.grad_clip, t.eval_interval) == (4578, 524288, 0.0, 125)
    assert grad_accum_steps(t, m.block_size, world_size=8) == 1  # 8 GPUs x 64 sequences x 1024 tokens
    assert t.eval_iters * t.batch_size * m.block_size == 10_485_760  # the record's val tokens
    assert isinstance(cfg.optim, Muon) and isinstance(cfg.lr, WarmupStableDecay)
    o = cfg.optim
    assert (o.lr, o.momentum, o.embedding_lr, o.head_lr, o.adamw_beta1, o.weight_decay) == (
        0.02,
        0.95,
        0.3,
        0.002,
        0.9,
        0,
    )
    assert round(cfg.lr.decay_ratio * t.max_iters) == 1308 and cfg.lr.warmup_iters == 0


def test_speedrun_gpt2_runs_a_few_steps_on_cpu_at_debug_size(gpt2_bpe: None, corpus_file: Path, tmp_path: Path) -> None:
    prepare_dataset(tmp_path / "data", "shakespeare_gpt2", corpus_file)
    result = run_script(
        "train",
        "experiment=speedrun_gpt2",
        "system=cpu",
        "data=shakespeare_gpt2",
        "model.depth=2",
        "model.block_size=32",
        "train.batch_size=2",
        "train.total_batch_size=128",
        "train.max_iters=4",
        "train.eval_interval=2",
        "train.eval_iters=2",
        "train.plot=false",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val[0] == pytest.approx(math.log(50304), abs=0.2) and val[-1] < val[0] - 0.3
    ckpt = load_checkpoint(tmp_path / "run")
    shape = ckpt["model_config"]
    assert (shape["n_layer"], shape["n_embd"], shape["n_head"], ckpt["step"]) == (2, 128, 1, 4)
    muon, adamw = ckpt["optimizers"]
    assert [g["initial_lr"] for g in muon["param_groups"]] == [0.02]
    assert [g["initial_lr"] for g in adamw["param_groups"]] == [0.3, 0.002]  # embedding, untied head


def test_the_report_gives_times_to_the_target_ratios_and_val_loss_at_the_budget() -> None:
    def run(label: str, round_: int, *points: tuple[int, float, float]) -> Run:
        return Run(label, round_, [{"iter": i, "val_loss": v, "train_seconds": s} for i, v, s in points])

    done = [
        run("a", 0, (0, 4.0, 0.0), (50, 2.0, 40.0), (100, 1.8, 80.0)),
        run("b", 0, (0, 4.0, 0.0), (50, 1.85, 10.0), (100, 1.7, 20.0)),
        run("a", 1, (0, 4.0, 0.0), (50, 2.0, 60.0), (100, 1.9, 100.0)),
        run("b", 1, (0, 4.0, 0.0), (50, 1.95, 14.0), (100, 1.8, 30.0)),
    ]
    cfg = BenchTimeToLossConfig(runs=["a", "b"], target=1.9)
    table = report(cfg, done, Path("w"))
    assert "| 1 | a | 100 | 80.0 | 80.0 | 1.8000 |" in table and "| 2 | b | 100 | 30.0 | 30.0 | 1.8000 |" in table
    # a: 80 and 100 s, median 90; b: 10 and 30 s, median 20 (0.22x). By a's median training time (90 s)
    # a had 1.8 (its end, at 80 s) and 2.0 (iter 50 of round 2), b its final 1.7 and 1.8
    assert "| a | 90.0 | 1.00x | 1.9000 |" in table and "| b | 20.0 | 0.22x | 1.7500 |" in table
    assert "| b | not reached |" in report(BenchTimeToLossConfig(runs=["a", "b"], target=1.75), done, Path("w"))


@pytest.mark.slow  # fast: the report above, and the refusals below
def test_the_benchmark_times_each_run_to_the_target_from_its_records(data_dir: Path, tmp_path: Path) -> None:
    runs = ["experiment=debug train.max_iters=8", "experiment=debug train.max_iters=8 model.positions=rope"]
    result = run_script(
        "bench_time_to_loss",
        "runs=[" + ",".join(f'"{r}"' for r in runs) + "]",
        "target=4.12",
        "repeats=1",
        "eval_interval=2",
        "eval_windows=8",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    (work,) = (tmp_path / "bench_time_to_loss").iterdir()
    for index, run in enumerate(runs):
        records = (work / "round1" / f"run{index + 1}" / "metrics.jsonl").read_text().splitlines()
        evaluations = [r for r in map(json.loads, records) if "val_loss" in r]
        assert [e["iter"] for e in evaluations] == [0, 2, 4, 6, 8]
        hit = next(e for e in evaluations if e["val_loss"] <= 4.12)
        row = f"| 1 | {run} | {hit['iter']} | {hit['train_seconds']:.1f} | {evaluations[-1]['train_seconds']:.1f} |"
        assert row in result.stdout, result.stdout
        assert re.search(rf"^\| {re.escape(run)} \| {hit['train_seconds']:.1f} \| ", result.stdout, re.M)


def test_the_benchmark_refuses_runs_that_would_evaluate_other_windows(data_dir: Path, tmp_path: Path) -> None:
    result = run_script(
        "bench_time_to_loss", 'runs=["experiment=debug"]', "eval_windows=6", f"paths.output_dir={tmp_path}"
    )
    assert_user_error(result, "eval_windows=6 is not a multiple of run 'experiment=debug''s train.batch_size=4")
    assert not (tmp_path / "bench_time_to_loss").exists()
    auto = "experiment=debug train.batch_size=auto train.total_batch_size=1024"
    result = run_script("bench_time_to_loss", f'runs=["{auto}"]', f"paths.output_dir={tmp_path}")
    assert_user_error(result, f"run '{auto}' sets train.batch_size=auto", "as a number")
    assert not (tmp_path / "bench_time_to_loss").exists()


def test_speedrun_cpu_is_tiny_cpus_run_with_todays_recipe() -> None:
    fast, tiny = (
        train_config(compose_config("train", [f"experiment={name}"])) for name in ("speedrun_cpu", "tiny_cpu")
    )
    shape = ("n_layer", "n_head", "n_embd", "block_size")
    assert [getattr(fast.model, k) for k in shape] == [getattr(tiny.model, k) for k in shape] == [4, 4, 128, 64]
    assert fast.model.name == "modern_cpu" and fast.data.name == tiny.data.name == "shakespeare_char"
    windows = fast.train.eval_iters * fast.train.batch_size
    assert windows == tiny.train.eval_iters * tiny.train.batch_size == 240  # the same val windows
    assert isinstance(fast.optim, Muon) and (fast.optim.lr, fast.optim.embedding_lr, fast.optim.head_lr) == (
        0.03,
        0.1,
        0.005,
    )
    assert isinstance(fast.lr, WarmupStableDecay) and (fast.train.max_iters, fast.train.batch_size) == (120, 40)


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ('["experiment=debug train.eval_iters=3"]', "run 'experiment=debug train.eval_iters=3' sets train.eval_iters"),
        ('["experiment=debug","experiment=debug"]', "runs lists the same run twice"),
        (
            '["experiment=debug model.n_layer=-1"]',
            "run 'experiment=debug model.n_layer=-1': model.n_layer must be >= 1",
        ),
    ],
)
def test_the_benchmark_refuses_what_it_would_not_measure_as_asked(runs: str, message: str, tmp_path: Path) -> None:
    result = run_script("bench_time_to_loss", f"runs={runs}", f"paths.output_dir={tmp_path}")
    assert_user_error(result, message)
    assert not (tmp_path / "bench_time_to_loss").exists()
