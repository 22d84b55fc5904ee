"""Shared fixtures: a prepared char dataset, a tiny trained run, and helpers to run the scripts."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# Copies GPT-2's BPE files into a tiktoken cache, so tiktoken.get_encoding("gpt2") works offline.
SEED_TIKTOKEN_CACHE = REPO.parent / "shared" / "tools" / "seed-tiktoken-cache"
# A small, fast model and run for tests: seconds on a CPU.
DEBUG_RUN = [
    "model=debug",
    "system=cpu",
    "train.batch_size=4",
    "train.eval_iters=2",
    "train.log_interval=1",
]


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run scripts/<script>.py as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=timeout,
    )


def torchrun(
    nproc: int, *args: str, cwd: Path, env: dict[str, str] | None = None, script: str = "train"
) -> subprocess.CompletedProcess:
    """scripts/<script>.py under `torchrun --standalone` with `nproc` CPU processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [*command, str(REPO / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def train_debug(data_dir: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/train.py on the debug model for 30 iterations, evaluating at 0, 15 and 30."""
    return run_script(
        "train",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        "train.max_iters=30",
        "train.eval_interval=15",
        "optim.lr=1e-2",
        *overrides,
    )


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


def prepare_dataset(data_dir: Path, data: str, source: Path | str, *overrides: str) -> Path:
    """Prepare `data=<data>` from `source` into data_dir, in this process; returns the dataset directory."""
    from hydragpt.config import prepare_config
    from hydragpt.data.prepare import prepare

    cfg = compose_config("prepare", [f"data={data}", f"paths.data_dir={data_dir}", f"data.source={source}", *overrides])
    return prepare(prepare_config(cfg))


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
