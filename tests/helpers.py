"""Helpers the tests share: paths, composing configs, running the scripts as a user would."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import hydragpt.train_config  # noqa: F401  (registers the config schemas that conf/ extends)
from hydragpt.data.dataset import TokenDataset

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# Copies GPT-2's BPE files into a tiktoken cache, so tiktoken.get_encoding("gpt2") works offline.
SEED_TIKTOKEN_CACHE = REPO.parent / "shared" / "tools" / "seed-tiktoken-cache"
# GPT-2's vocab.bpe and encoder.json, for a Hugging Face tokenizer built offline without our code.
GPT2_BPE_FILES = REPO.parent / "shared" / "data" / "gpt2-bpe"
# A small, fast model and run for tests: seconds on a CPU (plots, a second of matplotlib, and the report, a
# checkpoint load and samples, only where asked).
DEBUG_RUN = [
    "model=debug",
    "system=cpu",
    "train.batch_size=4",
    "train.eval_iters=2",
    "train.log_interval=1",
    "train.plot=false",
    "train.report=false",
]


def compose_config(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])


# This process forks the scripts, and a forked child cannot use a pool of OpenMP threads that its parent
# started: the tests' own computations run on one thread, and each script gets torch's default count.
SCRIPT_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


def run_script(
    script: str, *args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run scripts/<script>.py as a user would (its own process, arguments, working directory, output and
    exit status), in a child forked from this process: a fresh interpreter spends ~4 of a tiny run's 5
    seconds importing torch, whose optimizers import TorchDynamo, which this process has done once. With
    `env`, a fresh interpreter in that environment, for what a fork of pytest cannot stand in for: start-up
    hooks (PYTHONPATH's sitecustomize), launchers that pickle the job for processes of their own (submitit).
    On a machine with CUDA, whose driver a forked child cannot use once its parent asked for it, every
    script gets a fresh interpreter too."""
    argv = [str(REPO / "scripts" / f"{script}.py"), *args]
    if env is not None or torch.cuda.is_available():
        return subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout, env=env
        )
    _import_once()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            _run_as_main(argv, cwd or REPO, out.fileno(), err.fileno())
        returncode = _wait(pid, argv, timeout)
        out.seek(0)
        err.seek(0)
        stdout, stderr = (f.read().decode("utf-8", errors="replace") for f in (out, err))
    return subprocess.CompletedProcess([sys.executable, *argv], returncode, stdout, stderr)


@functools.cache
def _import_once() -> None:
    import torch._dynamo  # noqa: F401

    import hydragpt.evaluation
    import hydragpt.sampling
    import hydragpt.train  # noqa: F401


def _run_as_main(argv: list[str], cwd: Path, out: int, err: int) -> NoReturn:
    """In the forked child: what `python <script> <args>` would do from `cwd`, then exit with its status."""
    code = 1
    try:
        os.chdir(cwd)
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115
        sys.argv = argv
        torch.set_num_threads(SCRIPT_THREADS)
        atexit._clear()  # the parent's exit handlers are not this process's
        logging.getLogger().handlers.clear()  # pytest's capture handlers
        GlobalHydra.instance().clear()
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else 0 if ex.code is None else 1
        if isinstance(ex.code, str):
            print(ex.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, argv: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(argv, timeout)
        time.sleep(0.005)


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


def training_losses(run_dir: Path) -> dict[int, float]:
    """The run's training loss at each logged iteration, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def open_prepared(dataset_dir: Path) -> TokenDataset:
    """A prepared dataset, opened as a run opens it (an error's fix names a generic prepare command)."""
    return TokenDataset(dataset_dir, lambda: f"python scripts/prepare.py data=text data.name={dataset_dir.name}")


def prepare_dataset(data_dir: Path, data: str, source: Path | str, *overrides: str) -> Path:
    """Prepare `data=<data>` from `source` into data_dir, in this process; returns the dataset directory."""
    from hydragpt.config import prepare_config
    from hydragpt.data.prepare import prepare

    cfg = compose_config("prepare", [f"data={data}", f"paths.data_dir={data_dir}", f"data.source={source}", *overrides])
    return prepare(prepare_config(cfg))


def hf_gpt2(path: Path) -> torch.nn.Module:
    """A small GPT-2 with GPT-2's vocabulary, saved the way the Hub's are (OpenAI's gelu_new, biases).
    Every parameter is random, biases and layer norms included, so no mapping mistake hides behind a 0 or 1."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


def hf_gpt2_tokenizer(path: Path) -> None:
    """GPT-2's tokenizer files in `path`, built from the BPE files with `tokenizers` alone (as the Hub's:
    byte-level, <|endoftext|> as its end-of-text token), so transformers and lm-eval load it offline."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(GPT2_BPE_FILES / "encoder.json"), str(GPT2_BPE_FILES / "vocab.bpe")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    end = "<|endoftext|>"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, bos_token=end).save_pretrained(path)
