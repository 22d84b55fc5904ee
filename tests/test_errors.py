"""Every user mistake: exit status 2, exactly one `error:` line on stderr, no traceback, nothing damaged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydragpt.config import bench_prepare_config, eval_config, export_config, sample_config
from hydragpt.engine.checkpoint import RESUME_KEYS, load_checkpoint, save_checkpoint
from hydragpt.errors import UserError
from hydragpt.evaluation import read_hellaswag
from hydragpt.plot import plot_run
from hydragpt.sampling import next_token
from hydragpt.sweep import sweep_rows
from tests.helpers import DEBUG_RUN, REPO, compose_config, run_script


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert errors[0].endswith(")"), "error lines end with '(<how to fix it>)'"
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def train(data_dir: Path, tmp_path: Path, *overrides: str):
    return run_script(
        "train",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'out'}",
        "train.max_iters=2",
        *overrides,
    )


def test_missing_dataset(tmp_path: Path) -> None:
    result = train(tmp_path / "nodata", tmp_path)
    assert_user_error(result, "dataset 'shakespeare_char' is not prepared", "scripts/prepare.py data=shakespeare_char")
    assert not (tmp_path / "out").exists()  # found before Hydra made a run directory


def test_empty_dataset(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_script("prepare", f"paths.data_dir={tmp_path}", f"data.source={empty}")
    assert_user_error(result, "is empty")
    assert not (tmp_path / "shakespeare_char" / "meta.json").exists()


def test_missing_source(tmp_path: Path) -> None:
    result = run_script("prepare", f"paths.data_dir={tmp_path}", "data.source=/no/such/corpus.txt")
    assert_user_error(result, "data.source '/no/such/corpus.txt' does not exist")


def test_dataset_shorter_than_one_block(tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a tiny corpus " * 20)
    assert run_script("prepare", f"paths.data_dir={tmp_path}", f"data.source={short}").returncode == 0
    result = train(tmp_path, tmp_path, "model.block_size=64")
    assert_user_error(result, "fewer than one block", "use a smaller model.block_size")


def test_unknown_config_option(data_dir: Path, tmp_path: Path) -> None:
    assert_user_error(train(data_dir, tmp_path, "model=gpt5"), "Could not find 'model/gpt5'", "tiny_cpu")
    assert_user_error(train(data_dir, tmp_path, "train.max_iter=3"), "Could not override 'train.max_iter'")
    assert not (tmp_path / "out").exists()  # composition errors create no run directory


def test_n_embd_not_divisible_by_n_head(data_dir: Path, tmp_path: Path) -> None:
    result = train(data_dir, tmp_path, "model.n_embd=30", "model.n_head=4")
    assert_user_error(result, "model.n_embd=30 is not divisible by model.n_head=4")
    assert not (tmp_path / "out").exists()  # checked before the run directory is created


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("system.seed=-1", "system.seed must be in [0, 2^32), got -1"),
        ("system.device=cuda:x", "bad system.device 'cuda:x'"),
        ("system.device=tpu", "unknown system.device 'tpu'"),
        ("train.total_batch_size=1000", "train.total_batch_size=1000 is not divisible by"),
        ("system.device=cuda:", "bad system.device 'cuda:'"),
        ("optim.eps=-1", "optim.eps must be > 0"),
        ("train.crop_block_size=8", "train.crop_block_size only applies with train.init_from"),
        ("data.name=../../elsewhere", "data.name '../../elsewhere' is not a plain directory name"),
    ],
)
def test_bad_system_and_batch_settings(data_dir: Path, tmp_path: Path, override: str, fragment: str) -> None:
    assert_user_error(train(data_dir, tmp_path, override), fragment)
    assert not (tmp_path / "out").exists()


def test_unusable_output_directory(data_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_script("train", *DEBUG_RUN, f"paths.data_dir={data_dir}", f"paths.output_dir={blocker}")
    assert_user_error(result, "Not a directory", str(blocker))


def test_sample_seed_out_of_range(trained_run: Path) -> None:
    assert_user_error(run_script("sample", f"ckpt={trained_run}", "seed=-1"), "seed must be >= 0, got -1")


def test_nonexistent_checkpoint(tmp_path: Path) -> None:
    assert_user_error(run_script("sample", f"ckpt={tmp_path / 'nope.pt'}"), "does not exist")


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.pt"
    bogus.write_text("just some text\n")
    assert_user_error(run_script("sample", f"ckpt={bogus}"), "is not a readable hydragpt checkpoint")


def test_incomplete_checkpoints_are_refused(trained_run: Path, tmp_path: Path) -> None:
    hollow = tmp_path / "hollow.pt"
    save_checkpoint(hollow, {"step": 3})  # the right format marker, nothing else
    with pytest.raises(UserError, match=r"hollow.pt is an incomplete hydragpt checkpoint \(no model, model_config"):
        load_checkpoint(hollow)
    weights_only = {k: v for k, v in load_checkpoint(trained_run).items() if k not in ("optimizers", "rng")}
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", weights_only)  # samples, cannot resume
    assert load_checkpoint(tmp_path / "run")["step"] == 30
    with pytest.raises(UserError, match=r"incomplete hydragpt checkpoint \(no optimizers, rng\)"):
        load_checkpoint(tmp_path / "run", require=RESUME_KEYS)


def test_a_checkpoint_of_an_earlier_format_is_refused_with_its_fix(trained_run: Path, tmp_path: Path) -> None:
    """Format 1 (one optimizer, a scheduler state) predates the instantiated engine: refused, not guessed at."""
    old = tmp_path / "old.pt"
    ckpt = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**ckpt, "version": 1}, old)
    result = run_script("sample", f"ckpt={old}")
    assert_user_error(result, "has checkpoint version 1, this hydragpt reads version 4")
    assert "use the hydragpt release that wrote it, or train it again" in result.stderr


def test_truncated_checkpoint_is_refused_and_left_alone(trained_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    data = (trained_run / "checkpoints" / "last.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    assert_user_error(run_script("sample", f"ckpt={broken}"), "is not a readable hydragpt checkpoint")
    assert broken.stat().st_size == len(data) // 2


def test_prompt_outside_the_char_vocab(trained_run: Path) -> None:
    result = run_script("sample", f"ckpt={trained_run}", "start='naïve ☃'", "max_new_tokens=3")
    assert_user_error(result, "outside the char vocabulary", "'ï'", "'☃'")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("top_k=0", "top_k must be >= 1, got 0"), ("temperature=-0.5", "temperature must be >= 0, got -0.5")],
)
def test_bad_sampling_settings(trained_run: Path, override: str, fragment: str) -> None:
    assert_user_error(run_script("sample", f"ckpt={trained_run}", override), fragment)


def test_missing_or_binary_prompt_file(trained_run: Path, tmp_path: Path) -> None:
    result = run_script("sample", f"ckpt={trained_run}", f"start=FILE:{tmp_path / 'none.txt'}")
    assert_user_error(result, "prompt file", "does not exist")
    binary = tmp_path / "prompt.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert_user_error(run_script("sample", f"ckpt={trained_run}", f"start=FILE:{binary}"), "cannot read prompt file")


def test_checkpoint_vocab_must_match_the_data(trained_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("0123456789 " * 500)
    assert run_script("prepare", f"paths.data_dir={tmp_path}", f"data.source={other}").returncode == 0
    result = train(tmp_path, tmp_path, f"train.init_from={trained_run}")
    assert_user_error(
        result,
        "was trained with another tokenizer than dataset 'shakespeare_char' was prepared with",
        "(it trained on data=shakespeare_char)",
        "train.init_from=scratch",
    )


def test_resume_of_a_directory_that_is_not_a_run(tmp_path: Path, data_dir: Path) -> None:
    result = train(data_dir, tmp_path, f"resume={tmp_path / 'no_such_run'}")
    assert_user_error(result, "is not a run directory")
    assert not (tmp_path / "no_such_run").exists()


def test_a_new_run_never_writes_over_an_old_one(train_run, tmp_path: Path) -> None:
    assert train_run("train.max_iters=2", "train.eval_interval=2").returncode == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in [*run.glob("checkpoints/*.pt"), *run.glob(".hydra/*.yaml")]}
    result = train_run("train.max_iters=4")  # the same hydra.run.dir, without resume=
    assert_user_error(result, f"{run} already holds a run with checkpoints", f"continue it with resume={run}")
    assert {p: p.read_bytes() for p in before} == before


def test_unusable_metrics_and_sweep_records(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n5\n{"loss": 1.0}\nnot json\n')
    with pytest.raises(UserError, match="holds no training or evaluation records"):
        plot_run(tmp_path)
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "result.json").write_text('{"status": "completed"}')
    with pytest.raises(UserError, match=r"result.json is not a sweep job's record"):
        sweep_rows(tmp_path / "sweep")


def test_unusable_hellaswag_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a directory"):
        read_hellaswag(tmp_path, "https://example.invalid/hellaswag.jsonl")
    binary = tmp_path / "hellaswag.jsonl"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_hellaswag(binary, "https://example.invalid/hellaswag.jsonl")


def test_output_files_are_checked_before_the_work(trained_run: Path, tmp_path: Path) -> None:
    """Checked with the config, before a checkpoint is loaded; a path whose directories are missing is fine."""
    for config, check in (("sample", sample_config), ("eval", eval_config)):
        with pytest.raises(UserError, match=f"out={re.escape(str(tmp_path))} is a directory"):
            check(compose_config(config, [f"ckpt={trained_run}", f"out={tmp_path}"]))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=f"{re.escape(str(tmp_path / 'file'))} is not a writable directory"):
        sample_config(compose_config("sample", [f"ckpt={trained_run}", f"out={tmp_path / 'file' / 'samples.txt'}"]))
    nested = tmp_path / "new" / "dir" / "samples.txt"
    result = run_script("sample", f"ckpt={trained_run}", f"out={nested}", "max_new_tokens=5", "num_samples=1")
    assert result.returncode == 0 and nested.is_file(), result.stderr


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    assert next_token(logits, 1e-45, None, None, None).flatten().tolist() == [1, 0]


@pytest.mark.parametrize(
    ("config", "schema", "override", "message"),
    [
        ("export", export_config, "out=", "out= is empty"),
        ("bench_prepare", bench_prepare_config, "seed=-1", "seed must be >= 0, got -1"),
        ("bench_prepare", bench_prepare_config, "tokenizer=foo", "unknown tokenizer 'foo'"),
    ],
)
def test_script_settings_checked_up_front(config: str, schema, override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        schema(compose_config(config, ["ckpt=x", override] if config == "export" else [override]))


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py"), f"ckpt={tmp_path / 'nope.pt'}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "UserError" in result.stderr
