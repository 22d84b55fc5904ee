"""The builder and the Trainer in-process (no scripts): what each part is built from, exact resume, and the
loop's device-side bookkeeping (nan/inf steps skipped and counted, stop signals read at log steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hydragpt.engine.builder import build_trainer
from hydragpt.engine.checkpoint import RESUME_KEYS, load_checkpoint
from hydragpt.engine.optim import Muon
from hydragpt.engine.preemption import StopSignals
from hydragpt.engine.trainer import Trainer, TrainingDiverged
from hydragpt.model import GPT
from hydragpt.registry import option
from hydragpt.train_config import TrainConfig, train_config
from tests.helpers import compose_config


@option("optim", "sgd")
class PlainSGD:
    """An optimizer no file under src/ knows: this class and a YAML the test writes are all it takes."""

    lr: float = 0.1  # peak learning rate

    def build(self, model: GPT, device: torch.device) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD([{"params": list(model.parameters()), "lr": self.lr, "initial_lr": self.lr}])]


@option("lr", "halving")
class Halving:
    """A schedule no file under src/ knows: the lr halves every `every` steps."""

    every: int = 2  # steps between halvings

    def factor(self, step: int, total_steps: int) -> float:
        return 0.5 ** (step // self.every)


def debug_config(data_dir: Path, *overrides: str) -> tuple[TrainConfig, dict]:
    cfg = compose_config("train", ["experiment=debug", f"paths.data_dir={data_dir}", "train.plot=false", *overrides])
    return train_config(cfg), cfg


def build(data_dir: Path, run_dir: Path, *overrides: str, resume: bool = False, **kwargs) -> Trainer:
    """The Trainer for a run directory that exists (Hydra makes it for the script)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    typed, cfg = debug_config(data_dir, *overrides)
    resume_from = load_checkpoint(run_dir, require=RESUME_KEYS) if resume else None
    plain = OmegaConf.to_container(cfg, resolve=True)
    return build_trainer(typed, run_dir, plain, {"model": "debug"}, resume_from=resume_from, **kwargs)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def test_the_builder_makes_each_part_from_its_option(data_dir: Path, tmp_path: Path) -> None:
    trainer = build(data_dir, tmp_path / "run", "optim=muon", "lr=wsd", "train.max_iters=8", "lr.decay_ratio=0.5")
    assert isinstance(trainer.model, GPT) and trainer.model.config.vocab_size == 65  # from the dataset
    assert [type(o).__name__ for o in trainer.optimizers] == ["Muon", "AdamW"]
    assert [g["lr"] for o in trainer.optimizers for g in o.param_groups] == [0.01, 0.006, 0.006]  # factor(0) = 1
    assert [trainer.schedule(step) for step in (3, 4, 6)] == [1.0, 1.0, 0.5]
    assert trainer.loop.max_iters == 8 and trainer.state.tokens_per_step == 4 * 32
    trainer.fit()
    ckpt = load_checkpoint(tmp_path / "run", require=RESUME_KEYS)
    assert ckpt["step"] == 8 and len(ckpt["optimizers"]) == 2
    assert ckpt["config"]["optim"]["_target_"] == "hydragpt.engine.optim.Muon"


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_continues_bitwise(data_dir: Path, tmp_path: Path, optim: str) -> None:
    common = (f"optim={optim}", "train.eval_interval=6", "train.log_interval=1", "data.sampling=sequential")
    build(data_dir, tmp_path / "whole", *common, "train.max_iters=12").fit()
    build(data_dir, tmp_path / "cut", *common, "train.max_iters=6").fit()
    resumed = build(data_dir, tmp_path / "cut", *common, "train.max_iters=12", resume=True)
    assert resumed.state.step == 6
    resumed.fit()
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")  # every step, to the last bit


def test_resume_after_a_kill_rewrites_the_lost_steps(data_dir: Path, tmp_path: Path) -> None:
    """Metrics logged after the last checkpoint are dropped on resume and made again: no duplicates."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    build(data_dir, straight, "train.max_iters=8", "train.eval_interval=4").fit()
    build(data_dir, killed, "train.max_iters=4", "train.eval_interval=4").fit()
    with open(killed / "metrics.jsonl", "a") as f:  # what a process killed at iter 6 had logged past step 4
        f.write(json.dumps({"iter": 4, "loss": 9.0}) + "\n" + json.dumps({"iter": 5, "loss": 9.0}) + "\n")
    build(data_dir, killed, "train.max_iters=8", "train.eval_interval=4", resume=True).fit()

    def records(run_dir: Path) -> tuple[list[tuple[int, float]], list[int]]:
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["iter"], r["loss"]) for r in lines if "loss" in r], [r["iter"] for r in lines if "val_loss" in r]

    assert records(killed) == records(straight)
    assert records(killed)[1] == [0, 4, 8]


def test_an_optimizer_or_a_schedule_is_one_class_and_one_yaml(data_dir: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    for group, name in (("optim", "sgd"), ("lr", "halving")):
        (conf / group).mkdir(parents=True)
        (conf / group / f"{name}.yaml").write_text(f"defaults:\n  - /schema/{group}/{name}@_here_\n  - _self_\n")
    common = (f"hydra.searchpath=[file://{conf}]", "optim=sgd", "lr=halving", "optim.lr=0.05", "train.eval_interval=2")
    trainer = build(data_dir, tmp_path / "run", *common, "train.max_iters=4")
    assert [type(o).__name__ for o in trainer.optimizers] == ["SGD"]
    assert [trainer.schedule(step) for step in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    trainer.fit()
    resumed = build(data_dir, tmp_path / "run", *common, "train.max_iters=6", resume=True)
    assert resumed.state.step == 4 and resumed.optimizers[0].param_groups[0]["lr"] == 0.05 * 0.25
    resumed.fit()
    assert sorted(losses(tmp_path / "run")) == list(range(6))


def test_in_training_samples_are_written_and_leave_training_unchanged(data_dir: Path, tmp_path: Path) -> None:
    common = ("train.max_iters=6", "train.eval_interval=3", "lr=constant", "lr.warmup_iters=0")
    build(data_dir, tmp_path / "plain", *common).fit()
    sampled = tmp_path / "sampled"
    build(
        data_dir, sampled, *common, "train.sample_interval=3", "train.sample_tokens=20", "train.sample_start=ROMEO:"
    ).fit()
    assert losses(sampled) == losses(tmp_path / "plain")  # sampling draws on its own generator
    assert not (tmp_path / "plain" / "samples").exists()
    files = sorted((sampled / "samples").iterdir())
    assert [f.name for f in files] == ["iter_000000.txt", "iter_000003.txt", "iter_000006.txt"]
    texts = [f.read_text() for f in files]
    assert all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 20 for t in texts)  # one character a token
    assert texts[0] != texts[-1]  # the same seed, a model that has learned


def test_a_nonfinite_step_between_log_steps_is_never_applied(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read at the next log step: the poisoned step is reported by its own iter, its update was skipped on
    the device, and the checkpoint on disk is the last one before it."""
    trainer = build(data_dir, tmp_path / "run", "train.max_iters=20", "train.log_interval=5", "train.eval_interval=5")
    forward = GPT.forward

    def poisoned(self, idx, targets=None, cache=None, reduction="mean"):
        logits, loss = forward(self, idx, targets, cache, reduction)
        if loss is not None and torch.is_grad_enabled() and trainer.state.step == 7:
            loss = loss + math.inf
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became inf at iter 7") as diverged:
        trainer.fit()
    assert f"then resume={tmp_path / 'run'} from its last checkpoint" in str(diverged.value)
    assert trainer.state.step == 10  # found when steps 6..10 were read, before step 10's evaluation
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert load_checkpoint(tmp_path / "run")["step"] == 5


def test_divergence_before_any_checkpoint_says_to_start_again(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = build(data_dir, tmp_path / "run", "train.max_iters=20", "train.eval_interval=10")
    forward = GPT.forward

    def poisoned(self, idx, targets=None, cache=None, reduction="mean"):
        logits, loss = forward(self, idx, targets, cache, reduction)
        return logits, (loss + math.inf if loss is not None and torch.is_grad_enabled() else loss)

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became inf at iter 0") as diverged:
        trainer.fit()
    assert "start again: the run saved no checkpoint before this" in str(diverged.value)
    assert "resume=" not in str(diverged.value)


def test_skip_nonfinite_counts_skipped_steps_read_from_the_device(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = build(data_dir, tmp_path / "run", "train.max_iters=10", "train.log_interval=4", "train.skip_nonfinite=2")
    forward = GPT.forward

    def poisoned(self, idx, targets=None, cache=None, reduction="mean"):
        logits, loss = forward(self, idx, targets, cache, reduction)
        if loss is not None and torch.is_grad_enabled() and trainer.state.step in (2, 3):
            loss = loss * math.nan
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    trainer.fit()
    assert trainer.state.nonfinite_steps == 2 and trainer.state.step == 10
    assert load_checkpoint(tmp_path / "run")["nonfinite_steps"] == 2


def test_a_stop_signal_ends_the_run_at_the_next_log_step_with_a_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    stop = StopSignals([])
    trainer = build(data_dir, tmp_path / "run", "train.max_iters=30", "train.log_interval=4", stop=stop)
    step = trainer.train_step

    def train_step() -> None:
        if trainer.state.step == 6:
            stop.received = "SIGTERM"
        step()

    trainer.train_step = train_step  # type: ignore[method-assign]
    trainer.fit()
    assert trainer.stopped_by == "SIGTERM" and trainer.state.step == 9  # iter 8 is the log step after 6
    assert load_checkpoint(tmp_path / "run")["step"] == 9


def test_the_typed_config_holds_option_instances(data_dir: Path) -> None:
    typed, _ = debug_config(data_dir, "optim=muon")
    assert isinstance(typed.optim, Muon) and typed.optim.lr == 1e-2  # the debug experiment's lr
