"""The GPU paths, on a machine that has one (marked `cuda`, skipped elsewhere): bfloat16 autocast, compile,
fused AdamW's on-device skip of a nan/inf step, batch_size=auto against CUDA's out-of-memory error,
activation checkpointing compiled, and NCCL across two GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hydragpt.engine.batch_size import largest_micro_batch
from hydragpt.engine.optim import AdamW, Muon, step_if_finite
from hydragpt.model import GPT, GPTConfig
from tests.helpers import run_script, torchrun

pytestmark = pytest.mark.cuda

CFG = GPTConfig(name="t", n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65)


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("compile", ["false", "true"])
def test_bf16_training_on_the_gpu_lowers_the_loss(data_dir: Path, tmp_path: Path, compile: str) -> None:
    run = tmp_path / "run"
    result = run_script(
        "train",
        "experiment=debug",
        "system=cuda",
        f"system.compile={compile}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        "train.max_iters=40",
        "train.eval_interval=40",
        "train.log_interval=10",
    )
    assert result.returncode == 0, result.stderr
    assert "bfloat16" in (run / "train.log").read_text()
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.5


def test_fused_adamw_skips_a_nonfinite_step_on_the_gpu() -> None:
    model = GPT(CFG).cuda()
    (optimizer,) = AdamW().build(model, torch.device("cuda"))
    assert optimizer.defaults["fused"]  # the default on CUDA
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_if_finite(optimizer, torch.ones((), device="cuda"))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_muon_undoes_a_nonfinite_step_on_the_gpu() -> None:
    model = GPT(CFG).cuda()
    optimizers = Muon().build(model, torch.device("cuda"))
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    for optimizer in optimizers:
        step_if_finite(optimizer, torch.ones((), device="cuda"))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    momentum = [s["momentum_buffer"] for s in optimizers[0].state.values()]
    assert momentum and all(not m.any() for m in momentum)  # as if never stepped


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("ddp", ["ddp", "fsdp"])
def test_two_gpus_over_nccl(data_dir: Path, tmp_path: Path, ddp: str) -> None:
    run = tmp_path / "run"
    result = torchrun(
        2,
        "experiment=debug",
        "system=cuda",
        f"ddp={ddp}",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run}",
        "train.max_iters=10",
        "train.eval_interval=10",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(train_losses(run)) == 10


def test_batch_size_auto_stops_where_the_gpu_runs_out_of_memory() -> None:
    """A small model with a vocabulary so large that 2**20 sequences cannot fit any GPU: the search catches
    CUDA's OutOfMemoryError, chooses a size below the largest, and that size trains."""
    device = torch.device("cuda")
    model = GPT(GPTConfig(name="t", n_layer=1, n_head=1, n_embd=32, block_size=64, vocab_size=65536)).to(device)
    chosen = largest_micro_batch(model, 2**20, 64, device, torch.bfloat16)
    assert 1 <= chosen < 2**20
    tokens = torch.randint(65536, (chosen, 65), device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)


def test_activation_checkpointing_trains_compiled_on_the_gpu(data_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ("experiment=debug", "system=cuda", f"paths.data_dir={data_dir}", "train.max_iters=20")
    result = run_script("train", *common, "system.activation_checkpointing=true", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr
    plain = tmp_path / "plain"
    assert run_script("train", *common, f"hydra.run.dir={plain}").returncode == 0
    assert train_losses(run) == pytest.approx(train_losses(plain), rel=2e-2)  # the same training, recomputed
