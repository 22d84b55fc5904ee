"""Helpers the tests share: paths, composing configs, running the scripts as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import hydragpt.train_config  # noqa: F401  (registers the config schemas that conf/ extends)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# Copies GPT-2's BPE files into a tiktoken cache, so tiktoken.get_encoding("gpt2") works offline.
SEED_TIKTOKEN_CACHE = REPO.parent / "shared" / "tools" / "seed-tiktoken-cache"
# A small, fast model and run for tests: seconds on a CPU (plots, a second of matplotlib, only where asked).
DEBUG_RUN = [
    "model=debug",
    "system=cpu",
    "train.batch_size=4",
    "train.eval_iters=2",
    "train.log_interval=1",
    "train.plot=false",
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


def prepare_dataset(data_dir: Path, data: str, source: Path | str, *overrides: str) -> Path:
    """Prepare `data=<data>` from `source` into data_dir, in this process; returns the dataset directory."""
    from hydragpt.config import prepare_config
    from hydragpt.data.prepare import prepare

    cfg = compose_config("prepare", [f"data={data}", f"paths.data_dir={data_dir}", f"data.source={source}", *overrides])
    return prepare(prepare_config(cfg))
