"""An override is applied or refused, never recorded and ignored; work is bounded; every error's fix works.

One test per case a user tried: each failed before its fix (the data's identity: tests/test_data_identity.py;
every knob's type and range: tests/test_knobs.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from hydragpt.config import eval_config, sample_config
from hydragpt.engine.checkpoint import load_checkpoint
from hydragpt.errors import UserError, user_errors_exit
from hydragpt.train_config import train_config
from tests.helpers import DEBUG_RUN, REPO, compose_config, run_script
from tests.test_errors import assert_user_error


def config_yaml(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def test_init_from_refuses_a_model_knob_its_weights_do_not_have(train_run, trained_run: Path, tmp_path: Path) -> None:
    result = train_run(f"train.init_from={trained_run}", "model.n_layer=4")
    assert_user_error(result, "model.n_layer=4 differs from the weights", "(n_layer=2)")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_records_the_shape_it_built(data_dir: Path, trained_run: Path, tmp_path: Path) -> None:
    """No model knob on the command line: the default flavour (tiny_cpu, 4 layers) gives way to the
    checkpoint's debug shape, and .hydra/config.yaml says so."""
    run_dir = tmp_path / "run"
    result = run_script(
        "train",
        *[o for o in DEBUG_RUN if not o.startswith("model=")],
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        f"train.init_from={trained_run}",
        "train.max_iters=1",
        "train.eval_interval=1",
    )
    assert result.returncode == 0, result.stderr
    assert config_yaml(run_dir)["model"] == load_checkpoint(trained_run)["model_config"]
    assert config_yaml(run_dir)["model"]["n_layer"] == 2


def test_resuming_to_fewer_steps_than_done_is_refused_and_changes_nothing(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".pt", ".jsonl")}
    result = run_script("train", f"resume={run_dir}", "train.max_iters=5")
    assert_user_error(result, "the run is at step 30, past the 5 steps", "train.max_iters=60")
    assert before == {p: p.read_bytes() for p in before}


def test_a_warmup_longer_than_the_run_is_applied_and_said(train_run) -> None:
    result = train_run("train.max_iters=3", "train.eval_interval=3", "lr.warmup_iters=100")
    assert result.returncode == 0, result.stderr
    assert "the lr never reaches its peak in this run's 3 steps" in result.stdout + result.stderr
    quiet = train_run("train.max_iters=3", "train.eval_interval=3", "lr.warmup_iters=2", run_dir=None)
    assert "never reaches its peak" not in quiet.stdout + quiet.stderr


def test_sampling_work_is_bounded(trained_run: Path) -> None:
    ckpt = f"ckpt={trained_run}"
    assert_user_error(run_script("sample", ckpt, "max_new_tokens=99999999999999999999"), "max_new_tokens=", "64 bits")
    assert_user_error(run_script("sample", ckpt, "max_new_tokens=1000001"), "more than sample.py generates")
    assert_user_error(run_script("sample", ckpt, "temperature=inf"), "temperature=inf is not a finite number")
    chat = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py"), ckpt, "chat=true", "max_new_tokens=5"],
        input="tokens 99999999999999999999\ntemp inf\nROMEO:\nquit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert "error: tokens must be in [1, 1,000,000]" in chat.stderr and "error: temperature must be" in chat.stderr
    assert len(chat.stdout.strip()) == len("ROMEO:") + 5  # the reply kept the length it had


def test_a_runs_checkpoints_folder_names_its_checkpoint(trained_run: Path) -> None:
    args = ("temperature=0", "num_samples=1", "max_new_tokens=20")
    by_folder = run_script("sample", f"ckpt={trained_run / 'checkpoints'}", *args)
    assert by_folder.returncode == 0, by_folder.stderr
    assert by_folder.stdout == run_script("sample", f"ckpt={trained_run}", *args).stdout


def test_a_bad_search_space_is_one_error_line(data_dir: Path, tmp_path: Path) -> None:
    result = run_script(
        "train",
        "-m",
        "hparams_search=optuna",
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "optim.lr=tag(log, interval(-1, 1e-2))",
    )
    assert_user_error(result, "must be larger than 0 for a log distribution", "tag(log, interval(1e-4, 1e-2))")
    assert "setup plugin" not in result.stdout  # Optuna's storage layer keeps its INFO lines to itself


def test_resume_refuses_what_it_would_record_and_ignore(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    seed = run_script("train", f"resume={run_dir}", "train.max_iters=40", "system.seed=3")
    assert_user_error(seed, "resume cannot change system.seed from 1337 to 3", f"train.init_from={run_dir}")
    moved = run_script("train", f"resume={run_dir}", "train.max_iters=40", f"hydra.run.dir={tmp_path / 'fork'}")
    assert_user_error(moved, "continues the run in its own directory", "drop hydra.run.dir")
    assert not (tmp_path / "fork").exists()


@pytest.mark.parametrize(
    ("validate", "script", "overrides", "message"),
    [
        (sample_config, "sample", ["chat=true", "num_samples=2"], "num_samples=2 has no effect without chat=false"),
        (sample_config, "sample", ["chat=true", "out=x.txt"], "out=x.txt has no effect without chat=false"),
        (eval_config, "eval", ["task=hellaswag", "split=train"], "split=train has no effect without task=val_loss"),
        (eval_config, "eval", ["show_examples=3"], "show_examples=3 has no effect without task=hellaswag"),
        (train_config, "train", ["train.hellaswag_examples=10"], "has no effect without train.hellaswag_interval"),
        (train_config, "train", ["train.sample_tokens=50"], "has no effect without train.sample_interval"),
        (train_config, "train", ["data.val_tokens=1000"], "data.val_tokens=1000 has no effect without data.val_split"),
        (
            train_config,
            "train",
            ["train.grad_accum_steps=4", "train.total_batch_size=4096"],
            "train.grad_accum_steps=4 has no effect: train.total_batch_size derives it",
        ),
    ],
)
def test_a_knob_that_would_be_ignored_is_refused(validate, script: str, overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        validate(compose_config(script, overrides))


def test_a_model_too_large_for_the_machine_is_refused_before_allocating(train_run, tmp_path: Path) -> None:
    result = train_run("model.n_embd=100000", "model.n_head=1")
    assert_user_error(result, "the model has 240.0B parameters", "for its weights alone", "make it smaller")


def test_running_out_of_memory_is_one_error_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix names what the script that ran out of memory can lower (sample.py's own knobs here)."""
    hydra = {"job": {"config_name": "sample"}, "mode": RunMode.RUN}
    monkeypatch.setattr(HydraConfig.instance(), "cfg", OmegaConf.create({"hydra": hydra}))

    @user_errors_exit
    def task() -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to"
            " allocate 120000000000 bytes. Error code 12 (Cannot allocate memory)"
        )

    with pytest.raises(SystemExit) as exited:
        task()
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "error: out of memory: can't allocate memory: you tried to allocate 120000000000 bytes (lower num_samples"
        " or max_new_tokens, or use device=cpu)\n"
    )


@pytest.mark.parametrize(
    ("script", "failing", "fix", "following"),
    [
        ("sample", ["start=Nay, my lord!"], "quote a value", ["start='Nay, my lord!'"]),
        ("sample", ["device=mps"], "use device=cpu or device=auto", ["device=cpu"]),
        ("eval", ["show_examples=3", "limit=2"], "show_examples=0", ["show_examples=0", "limit=2"]),
        ("eval", ["split=nope", "limit=2"], "use one of: train, val", ["split=train", "limit=2"]),
    ],
)
def test_following_the_fix_works(trained_run: Path, data_dir: Path, script, failing, fix, following) -> None:
    common = [f"ckpt={trained_run}"]
    common += [f"paths.data_dir={data_dir}"] if script == "eval" else ["max_new_tokens=5", "num_samples=1"]
    assert_user_error(run_script(script, *common, *failing), fix)
    followed = run_script(script, *common, *following)
    assert followed.returncode == 0, followed.stderr
