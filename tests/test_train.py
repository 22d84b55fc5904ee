"""The trainer end to end through scripts/train.py: run directory, metrics, checkpoints, exact resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hydragpt.engine.checkpoint import clean_state_dict, load_checkpoint, save_checkpoint
from hydragpt.errors import UserError
from hydragpt.loggers import read_metrics as read_run_metrics
from hydragpt.loggers import trim_metrics
from tests.helpers import DEBUG_RUN, REPO


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def test_run_directory_layout_and_metrics(train_run, tmp_path: Path) -> None:
    result = train_run("train.max_iters=12", "train.eval_interval=6", "train.log_interval=5", "train.plot=true")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    for name in (
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
        "train.log",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "plots/metrics.png",
    ):
        assert (run / name).is_file(), name
    steps, evals = read_metrics(run)
    assert [r["iter"] for r in steps] == [0, 5, 10, 11]  # every log_interval, and the last step
    assert set(steps[0]) >= {
        "iter",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "tokens_seen",
        "time",
    }
    assert steps[-1]["tokens_seen"] == 12 * 4 * 32  # steps x batch x block
    assert [r["iter"] for r in evals] == [0, 6, 12]
    assert set(evals[0]) >= {"iter", "train_loss", "val_loss"}
    assert "eval at iter 12" in (run / "train.log").read_text()
    assert "iter 5: loss" in result.stdout
    assert not list(run.glob("checkpoints/.*tmp*"))  # no temporary files left behind


def test_a_few_steps_lower_the_loss(train_run, tmp_path: Path) -> None:
    result = train_run("train.max_iters=40", "train.eval_interval=40", "optim.lr=1e-2", "lr.warmup_iters=5")
    assert result.returncode == 0, result.stderr
    steps, evals = read_metrics(tmp_path / "run")
    assert evals[0]["val_loss"] > 3.9  # about ln(65) at init
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5]) - 4


def test_checkpoint_contract(trained_run: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["step"] == 30 and ckpt["tokens_seen"] == 30 * 4 * 32
    assert ckpt["model_config"]["n_layer"] == 2 and ckpt["model_config"]["vocab_size"] == len(
        ckpt["tokenizer"]["chars"]
    )
    assert ckpt["tokenizer"]["kind"] == "char"
    assert ckpt["config"]["train"]["max_iters"] == 30
    for key in ("optimizers", "scaler", "best_val_loss", "rng", "loader"):
        assert key in ckpt
    assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) >= {"python", "numpy", "torch"}  # one per rank


@pytest.mark.parametrize("reported_as", ["OSError", "RuntimeError"])
def test_a_failed_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reported_as: str
) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def write_half_then_fail(obj: object, f) -> None:  # a crash or a full disk in the middle of a write
        f.write(b"PK\x03\x04 half a checkpoint")
        full = OSError(28, "No space left on device")
        if reported_as == "OSError":
            raise full
        try:  # how torch.save's zip writer reports it
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64") from None

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(UserError, match=r"could not write checkpoint .*No space left on device"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path, require=("step",))["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_wrapper_prefixes_are_stripped() -> None:
    weights = torch.zeros(1)
    cleaned = clean_state_dict({"_orig_mod.module.lm_head.weight": weights, "module.wpe": weights, "x": weights})
    assert list(cleaned) == ["lm_head.weight", "wpe", "x"]


@pytest.mark.slow  # fast: the engine's bitwise resume in-process, and resume through the script after SIGTERM
@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_reproduces_the_uninterrupted_losses(train_run, tmp_path: Path, sampling: str) -> None:
    common = (
        "lr.decay_iters=40",
        "train.eval_interval=10",
        "lr.warmup_iters=5",
        "model.dropout=0.1",
        f"data.sampling={sampling}",
    )
    straight, first = tmp_path / "straight", tmp_path / "resumed"
    assert train_run("train.max_iters=40", *common, run_dir=straight).returncode == 0
    assert train_run("train.max_iters=20", *common, run_dir=first).returncode == 0
    result = train_run(f"resume={first}", "train.max_iters=40", run_dir=first)
    assert result.returncode == 0, result.stderr
    straight_steps, _ = read_metrics(straight)
    resumed_steps, _ = read_metrics(first)
    assert [r["iter"] for r in resumed_steps] == list(range(40))
    assert [r["loss"] for r in resumed_steps] == [r["loss"] for r in straight_steps]
    assert [r["lr"] for r in resumed_steps] == [r["lr"] for r in straight_steps]
    # the run's record shows the config now in force and every invocation's overrides
    assert yaml.safe_load((first / ".hydra" / "config.yaml").read_text())["train"]["max_iters"] == 40
    assert "train.max_iters=40" in yaml.safe_load((first / ".hydra" / "overrides.yaml").read_text())
    assert "resuming" in (first / "train.log").read_text()


def test_resume_refuses_shape_changes(train_run, trained_run: Path, tmp_path: Path) -> None:
    before = (trained_run / "checkpoints" / "last.pt").read_bytes()
    for override, message in [
        ("model.n_embd=64", "resume cannot change model.n_embd from 32 to 64"),
        ("model=tiny_cpu", "cannot apply 'model=tiny_cpu' when resuming"),
    ]:
        result = train_run(f"resume={trained_run}", "train.max_iters=40", override, run_dir=trained_run)
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
    assert (trained_run / "checkpoints" / "last.pt").read_bytes() == before


def test_init_from_checkpoint_starts_a_new_run(train_run, trained_run: Path, tmp_path: Path) -> None:
    _, saved_evals = read_metrics(trained_run)
    result = train_run(
        f"train.init_from={trained_run / 'checkpoints' / 'last.pt'}",
        "train.eval_only=true",
    )
    assert result.returncode == 0, result.stderr
    _, evals = read_metrics(tmp_path / "run")
    assert len(evals) == 1 and evals[0]["iter"] == 0
    assert evals[0]["val_loss"] == pytest.approx(saved_evals[-1]["val_loss"], abs=1e-4)
    assert not (tmp_path / "run" / "checkpoints").exists()  # eval_only writes no checkpoint


def test_init_from_with_a_shorter_context(train_run, trained_run: Path, tmp_path: Path) -> None:
    result = train_run(f"train.init_from={trained_run}", "train.crop_block_size=16", "train.max_iters=2")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["model_config"]["block_size"] == 16 and ckpt["model"]["transformer.wpe.weight"].shape[0] == 16
    assert ckpt["config"]["model"]["block_size"] == 16  # the recorded config is the shape actually built
    refused = train_run(f"train.init_from={trained_run}", "train.crop_block_size=64", run_dir=tmp_path / "other")
    assert refused.returncode == 2 and "larger than the checkpoint's block_size 32" in refused.stderr


@pytest.mark.parametrize("sampling", ["random", pytest.param("sequential", marks=pytest.mark.slow)])
def test_gradient_accumulation_matches_the_larger_batch(train_run, tmp_path: Path, sampling: str) -> None:
    """batch 4 x 1 micro-step and batch 2 x 2 micro-steps see the same windows and take the same steps."""
    common = ("train.max_iters=5", "train.eval_interval=5", f"data.sampling={sampling}")
    assert train_run(*common, "train.batch_size=4", run_dir=tmp_path / "a").returncode == 0
    assert train_run(*common, "train.batch_size=2", "train.grad_accum_steps=2", run_dir=tmp_path / "b").returncode == 0
    losses_a = [r["loss"] for r in read_metrics(tmp_path / "a")[0]]
    losses_b = [r["loss"] for r in read_metrics(tmp_path / "b")[0]]
    assert len(losses_a) == 5 and losses_a == pytest.approx(losses_b, rel=1e-5)


def test_resume_without_last_checkpoint_uses_best(train_run, tmp_path: Path) -> None:
    """always_save_checkpoint=false writes last.pt only at the end: an interrupted run resumes from best.pt."""
    run = tmp_path / "run"
    assert train_run("train.max_iters=6", "train.eval_interval=3", "train.always_save_checkpoint=false").returncode == 0
    (run / "checkpoints" / "last.pt").unlink()
    best_step = load_checkpoint(run / "checkpoints" / "best.pt")["step"]
    result = train_run(f"resume={run}", "train.max_iters=9", run_dir=run)
    assert result.returncode == 0, result.stderr
    assert f"from iter {best_step}" in result.stdout
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 9


def test_run_directory_resolves_to_the_later_step_not_the_newer_file(tmp_path: Path) -> None:
    """Copies need not keep file times: a run directory means the checkpoint with the higher step."""
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints / "last.pt", {"step": 10})
    save_checkpoint(checkpoints / "best.pt", {"step": 8})  # written later, so the newer file
    assert load_checkpoint(tmp_path, require=("step",))["step"] == 10
    save_checkpoint(checkpoints / "best.pt", {"step": 12})
    assert load_checkpoint(tmp_path, require=("step",))["step"] == 12


def test_a_torn_metrics_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "loss": 4.2}\n{"iter": 1, "lo')
    assert read_run_metrics(tmp_path) == [{"iter": 0, "loss": 4.2}]
    trim_metrics(tmp_path, step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iter": 0, "loss": 4.2}\n'


def test_resume_into_float16_from_a_float32_run(train_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train_run("train.max_iters=2", "train.eval_interval=2").returncode == 0
    result = train_run(f"resume={run}", "train.max_iters=4", "system.dtype=float16", run_dir=run)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run)["scaler"]["scale"] > 0  # the float16 run saved its grad scaler


def test_two_runs_never_share_a_directory(data_dir: Path, tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "scripts" / "train.py"),
                *DEBUG_RUN,
                f"paths.data_dir={data_dir}",
                f"paths.output_dir={tmp_path}",
                "train.max_iters=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    runs = list(tmp_path.glob("*/*/train.log"))
    assert len(runs) == 2
    assert all(len(r.parent.name) == len("HH-MM-SS-ffffff") for r in runs)


def test_best_only_checkpoints_without_always_save(train_run, tmp_path: Path) -> None:
    result = train_run("train.max_iters=12", "train.eval_interval=4", "train.always_save_checkpoint=false")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    _, evals = read_metrics(run)
    best = min(evals[1:], key=lambda r: r["val_loss"])
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == best["iter"]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 12  # written at the end


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cpu(train_run, tmp_path: Path, dtype: str) -> None:
    result = train_run("train.max_iters=3", "train.eval_interval=3", f"system.dtype={dtype}")
    assert result.returncode == 0, result.stderr
    steps, _ = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in steps) and f"cpu, {dtype}" in result.stdout
    assert bool(load_checkpoint(tmp_path / "run")["scaler"]) == (dtype == "float16")  # a scaler only for fp16


@pytest.mark.slow
def test_compiled_model_saves_plain_keys(train_run, tmp_path: Path) -> None:
    result = train_run("train.max_iters=3", "train.eval_interval=3", "system.compile=true")
    assert result.returncode == 0, result.stderr
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert "lm_head.weight" in ckpt["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
