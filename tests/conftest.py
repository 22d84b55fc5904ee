"""Shared fixtures: a corpus, a prepared char dataset, a tiny trained run (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import DEBUG_RUN, SEED_TIKTOKEN_CACHE, SHAKESPEARE, run_script, train_debug


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-Shakespeare corpus when ../shared has it, else a generated English-like text."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    rng = random.Random(0)
    words = "the king and queen of england shall speak to thee my lord what say you now".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(20000)]
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def gpt2_bpe(tmp_path_factory: pytest.TempPathFactory) -> None:
    """tiktoken's GPT-2 encoding, offline: a cache seeded from ../shared, for this process and its children."""
    if not SEED_TIKTOKEN_CACHE.is_file():
        pytest.skip("GPT-2's BPE files are not available offline (../shared/tools/seed-tiktoken-cache)")
    cache = tmp_path_factory.mktemp("tiktoken")
    subprocess.run([str(SEED_TIKTOKEN_CACHE), str(cache)], check=True, capture_output=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A paths.data_dir holding a prepared shakespeare_char dataset."""
    root = tmp_path_factory.mktemp("data")
    result = run_script("prepare", f"paths.data_dir={root}", f"data.source={corpus_file}")
    assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def train_run(data_dir: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run scripts/train.py on the debug model into tmp_path/run (extra overrides appended)."""

    def run(*overrides: str, run_dir: Path | None = None) -> subprocess.CompletedProcess:
        return run_script(
            "train",
            *DEBUG_RUN,
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"hydra.run.dir={run_dir or tmp_path / 'run'}",
            *overrides,
        )

    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A finished 30-iteration debug run, shared by the sampling and error tests."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train_debug(data_dir, run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` are skipped, with the reason shown, on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
