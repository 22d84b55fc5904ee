"""The trainer runs unchanged on GPT-2 BPE data and on a `text` corpus of one's own (sequential sampling)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import prepare_dataset, train_debug


def train_on(data_dir: Path, run_dir: Path, *overrides: str) -> list[dict]:
    result = train_debug(data_dir, run_dir, *overrides)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dataset", ["shakespeare_gpt2", "text"])
def test_training_on_bpe_datasets(gpt2_bpe: None, tmp_path: Path, corpus_file: Path, dataset: str) -> None:
    if dataset == "text":  # one's own corpus: a .jsonl of documents
        lines = corpus_file.read_text().split("\n\n")[:400]
        source = tmp_path / "docs.jsonl"
        source.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in lines))
    else:
        source = corpus_file
    prepare_dataset(tmp_path / "data", dataset, source)
    records = train_on(tmp_path / "data", tmp_path / "run", f"data={dataset}")
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 15, 30]
    assert evals[0]["val_loss"] == pytest.approx(10.82, abs=0.1)  # ln(50257): GPT-2's vocabulary
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0


@pytest.mark.parametrize(
    ("length", "steps"),
    [
        ("train.max_tokens=640", 5),  # 640 tokens / (batch 4 x block 32)
        ("train.epochs=0.5", 71),  # ceil(0.5 x 562 windows / 4 per step)
    ],
)
def test_training_length_by_tokens_or_epochs(tmp_path: Path, corpus_file: Path, length: str, steps: int) -> None:
    source = tmp_path / "small.txt"
    source.write_text(corpus_file.read_text()[:20_000])  # 18,000 training tokens: 562 windows of 32
    prepare_dataset(tmp_path / "data", "shakespeare_char", source)
    run_dir = tmp_path / "run"
    records = train_on(tmp_path / "data", run_dir, length, "data.sampling=sequential", "lr.warmup_iters=2")
    assert max(r["iter"] for r in records if "loss" in r) == steps - 1  # not train.max_iters=30
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == steps and ckpt["loader"] == {"sampling": "sequential", "position": 4 * steps}
    lr = ckpt["optimizers"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3)  # lr.min_lr_ratio (0.1) x optim.lr (1e-2), reached at the derived last step
