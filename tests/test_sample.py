"""Sampling: reproducible under a seed, greedy at temperature 0, prompt files, token filtering."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hydragpt.sampling import SEPARATOR, latest_checkpoint, next_token
from tests.conftest import run_script


def samples(result) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.split(SEPARATOR + "\n")[:-1]


def sample(trained_run: Path, *args: str) -> list[str]:
    return samples(run_script("sample", f"ckpt={trained_run / 'checkpoints' / 'last.pt'}", "max_new_tokens=40", *args))


def test_same_seed_same_samples_other_seed_other_samples(trained_run: Path) -> None:
    first = sample(trained_run, "seed=7", "num_samples=2", "start=ROMEO:")
    assert len(first) == 2 and all(s.startswith("ROMEO:") and len(s) > len("ROMEO:\n") for s in first)
    assert first[0] != first[1]  # independent samples within the batch
    assert sample(trained_run, "seed=7", "num_samples=2", "start=ROMEO:") == first
    assert sample(trained_run, "seed=8", "num_samples=2", "start=ROMEO:") != first


def test_temperature_zero_is_greedy_whatever_the_seed(trained_run: Path) -> None:
    a = sample(trained_run, "temperature=0", "seed=1", "num_samples=2")
    b = sample(trained_run, "temperature=0", "seed=2", "num_samples=1")
    assert a[0] == a[1] == b[0]


def test_prompt_from_file_and_run_directory_as_ckpt(trained_run: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("KING:\nWhat")
    result = run_script(
        "sample",
        f"ckpt={trained_run}",
        f"start=FILE:{prompt}",
        "num_samples=1",
        "max_new_tokens=5",
        "temperature=0",
    )
    (text,) = samples(result)
    assert text.startswith("KING:\nWhat") and len(text) == len("KING:\nWhat") + 5 + 1  # + print's newline


def test_latest_checkpoint_is_the_newest(tmp_path: Path) -> None:
    old = tmp_path / "2026-01-01" / "a" / "checkpoints" / "last.pt"
    new = tmp_path / "multirun" / "2026-01-02" / "b" / "0" / "checkpoints" / "last.pt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        time_ns = 1_700_000_000_000_000_000 + i * 10**9
        os.utime(path, ns=(time_ns, time_ns))
    assert latest_checkpoint(tmp_path) == new


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(next_token(logits, 1.0, 1, None, g).flatten().tolist()) == {1}
    assert set(next_token(logits, 1.0, 2, None, g).flatten().tolist()) == {1, 3}
    # probabilities ~ [0.03, 0.64, 0.09, 0.24]: top_p=0.7 keeps the two most likely tokens
    assert set(next_token(logits, 1.0, None, 0.7, g).flatten().tolist()) == {1, 3}
    assert set(next_token(logits, 1.0, None, 0.5, g).flatten().tolist()) == {1}
    assert next_token(logits, 0.0, None, None, g).flatten().tolist() == [1] * 200
