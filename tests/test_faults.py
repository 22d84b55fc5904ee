"""Fault injection: kills, stop signals, poisoned batches, full disks, concurrent resumes and changing data.

The faults are real (SIGKILL, SIGTERM, a tmpfs that fills up, a shard cut in half); tests/fault_hooks only
slows a run down or poisons it so that a test can hit a chosen instant (see its docstring).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hydragpt.engine.checkpoint import keep_step_checkpoint, load_checkpoint, save_checkpoint, step_checkpoints
from hydragpt.engine.preemption import PREEMPTED_EXIT
from hydragpt.engine.run_lock import RunLock
from hydragpt.errors import UserError
from hydragpt.train_config import train_config
from tests.helpers import DEBUG_RUN, REPO, compose_config, open_prepared, run_script, training_losses

HOOKS = Path(__file__).parent / "fault_hooks"
MAX_ITERS = 60
# One run setting for every test here: training losses do not depend on when evaluations happen, so any
# of these runs, however interrupted, must end with the reference run's losses.
RUN = [*DEBUG_RUN, f"train.max_iters={MAX_ITERS}", "optim.lr=1e-2", "lr.warmup_iters=5", "model.dropout=0.1"]


def command(data_dir: Path, run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    script = str(REPO / "scripts" / "train.py")
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, script, *RUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides]


def train_here(data_dir: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """One run of RUN without hooks, forked from this process (no interpreter to start)."""
    return run_script("train", *RUN, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides)


def hooked(**variables: object) -> dict[str, str]:
    """The environment of a training process with tests/fault_hooks active."""
    return {**os.environ, "PYTHONPATH": str(HOOKS), **{f"HYDRAGPT_TEST_{k}": str(v) for k, v in variables.items()}}


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def logged_iters(run_dir: Path) -> int:
    """How many training records the run has written so far (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"loss"') if path.is_file() else 0


def wait_for(condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The uninterrupted run's training loss at every iteration."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train_here(data_dir, run_dir, "train.eval_interval=30")
    assert result.returncode == 0, result.stderr
    losses = training_losses(run_dir)
    assert sorted(losses) == list(range(MAX_ITERS))
    return losses


@pytest.mark.parametrize("kills", [2, pytest.param(20, marks=pytest.mark.slow)])
def test_kill_9_at_random_instants_then_resume(
    data_dir: Path, tmp_path: Path, reference: dict[int, float], kills: int
) -> None:
    """SIGKILL at `kills` instants of one run (half of them while a checkpoint is being written): each time
    last.pt loads and `resume=` continues; the finished run has the uninterrupted run's losses (to float32
    rounding). The 20-kill chain is slow; 2 kills (one while writing) keep the behaviour in the fast suite."""
    rng = random.Random(6)
    run_dir, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt_dir = last.parent
    # a checkpoint every 2 steps, each write slowed to 0.1 s so that half the kills can land inside one
    env = hooked(STEP_SLEEP=0.01, SLOW_FSYNC=0.1)
    proc = start(command(data_dir, run_dir, "train.eval_interval=2", "train.eval_iters=1"), env)
    wait_for(last.exists)
    steps = []
    for kill in range(kills):
        if kill % 2:  # while a checkpoint is being written
            wait_for(lambda: any(ckpt_dir.glob(".*.tmp-*")))
        else:  # at a random instant once the process trains (kills during start-up would show little)
            trained = logged_iters(run_dir)
            wait_for(lambda: logged_iters(run_dir) > trained)  # noqa: B023 (called within the iteration)
            time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, f"the run finished before kill {kill + 1}: make it longer"
        steps.append(load_checkpoint(last)["step"])  # loads with weights_only=True, whatever the instant
        proc = start(command(data_dir, run_dir, f"resume={run_dir}"), env)
        if kill == 0:
            wait_for(lambda: "taking over the stale lock" in (run_dir / "train.log").read_text())
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert steps == sorted(steps) and steps[-1] < MAX_ITERS  # every kill hit the run mid-way
    # to float32 rounding: one CI run of this 21-process chain showed 6 of 60 losses one ulp off (never
    # reproduced, and not carried into later steps); the exact comparison is the SIGTERM test's
    assert training_losses(run_dir) == pytest.approx(reference, rel=1e-6, abs=0)
    assert not list(ckpt_dir.glob(".*.tmp-*"))  # the resumed process cleared the unfinished writes


# 2 ranks (three torchrun jobs) is slow; signals under torchrun stay fast in the collective test below
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_saves_the_step_and_resume_is_exact(
    data_dir: Path, tmp_path: Path, reference: dict[int, float], nproc: int
) -> None:
    """SIGTERM at a random step: the run stops after that step with a checkpoint of it and exit status
    PREEMPTED_EXIT, and the resumed run's losses equal the uninterrupted run's. Under torchrun the signal
    goes to rank 1 alone, and rank 0 stops at the same step."""
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    after = random.Random(nproc).randint(5, 40)
    cmd = command(data_dir, run_dir, "train.eval_interval=25", nproc=nproc)
    proc = start(cmd, hooked(STEP_SLEEP=0.05, PID_DIR=pids))
    wait_for(lambda: logged_iters(run_dir) >= after)
    target = int((pids / f"rank{nproc - 1}.pid").read_text())
    os.kill(target, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"stopped by (.+) after iter (\d+) of 60", log)
    assert stopped, log
    step = int(stopped.group(2)) + 1
    assert after <= step < MAX_ITERS
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == step
    if nproc == 1:
        assert proc.returncode == PREEMPTED_EXIT, err
        assert stopped.group(1) == "SIGTERM"
    else:  # torchrun exits 1 and reports the first worker to exit (rank 1, with 75), then stops rank 0
        assert proc.returncode == 1 and f"exitcode  : {PREEMPTED_EXIT}" in err, err
        assert f"[rank 1] WARNING hydragpt.train: stopped by SIGTERM after iter {step - 1} of 60" in err
        assert stopped.group(1) == "a stop signal to another rank"  # rank 0, which wrote the log, stopped with it
    assert not (run_dir / "plots").exists() and not (run_dir / "report.md").exists()  # they wait for the end
    report = run_script("report", f"run={run_dir}", "samples=1", "sample_tokens=20")
    assert report.returncode == 0, report.stderr
    assert (run_dir / "report.md").read_text().splitlines()[2] == (
        f"**Stopped** at step {step} of 60; `python scripts/train.py resume={run_dir}` continues it."
    )
    assert max(training_losses(run_dir)) < step  # nothing past the checkpoint
    resume_cmd = command(data_dir, run_dir, f"resume={run_dir}", nproc=nproc)
    resume = subprocess.run(resume_cmd, capture_output=True, text=True)
    assert resume.returncode == 0, resume.stderr
    losses = training_losses(run_dir)
    assert sorted(losses) == list(range(MAX_ITERS))
    if nproc == 1:
        assert losses == reference
    else:  # two ranks draw other batches than one process: compare with an uninterrupted 2-rank run
        straight = subprocess.run(
            command(data_dir, tmp_path / "straight", "train.eval_interval=30", nproc=2), capture_output=True, text=True
        )
        assert straight.returncode == 0, straight.stderr
        assert losses == training_losses(tmp_path / "straight")


def test_a_second_signal_exits_at_once(data_dir: Path, tmp_path: Path) -> None:
    """The first Ctrl-C asks for a checkpoint at the end of the step; the second ends the process now."""
    run_dir, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    proc = start(command(data_dir, run_dir), hooked(STEP_SLEEP=30, PID_DIR=pids))
    wait_for(lambda: (pids / "rank0.pid").exists())
    time.sleep(0.5)  # inside the step's long sleep
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # a repeat within a second is the same signal delivered twice, not a second one
    assert proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 128 + signal.SIGINT  # as the shell reports a process killed by it
    assert time.monotonic() - sent < 5


def test_a_second_signal_ends_a_rank_blocked_in_a_collective(data_dir: Path, tmp_path: Path) -> None:
    """Rank 0 waits in gloo for a stalled rank 1, where Python runs no signal handler: the second SIGTERM
    still ends it at once (the signals are watched from a thread)."""
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = command(data_dir, tmp_path / "run", "ddp.timeout=300", nproc=2)
    torchrun = start(cmd, hooked(STALL_RANK1_AT=5, PID_DIR=pids))
    try:
        wait_for(lambda: logged_iters(tmp_path / "run") >= 5)
        rank0 = int((pids / "rank0.pid").read_text())
        time.sleep(1)  # rank 0 is now inside the step's all-reduce
        os.kill(rank0, signal.SIGTERM)
        time.sleep(1.5)
        assert Path(f"/proc/{rank0}").exists()  # the first signal waits for the step to end
        os.kill(rank0, signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: not Path(f"/proc/{rank0}").exists() or "Z" in _state(rank0), timeout=10)
        assert time.monotonic() - sent < 5
    finally:
        for pid in (torchrun.pid, *(int(p.read_text()) for p in pids.glob("*.pid"))):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        torchrun.wait()


def _state(pid: int) -> str:
    """The process state letter from /proc (Z: exited, not yet reaped by its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"


def test_a_poisoned_batch_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = command(data_dir, run_dir, "train.eval_interval=10")
    result = subprocess.run(cmd, capture_output=True, text=True, env=hooked(POISON_AT=25))
    assert result.returncode == 2
    assert result.stderr.startswith("error: loss became inf at iter 25 (lower optim.lr"), result.stderr
    assert "Traceback" not in result.stderr
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == 20  # the evaluation before the poisoned batch
    assert all(torch.isfinite(w).all() for w in ckpt["model"].values())
    assert max(training_losses(run_dir)) == 24


def test_skip_nonfinite_skips_the_poisoned_step(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = command(data_dir, run_dir, "train.eval_interval=30", "train.skip_nonfinite=1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=hooked(POISON_AT=25))
    assert result.returncode == 0, result.stderr
    assert "iter 25: loss became inf; step skipped (1 of train.skip_nonfinite=1)" in result.stdout
    losses = training_losses(run_dir)
    assert 25 not in losses and sorted(losses) == [i for i in range(MAX_ITERS) if i != 25]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == MAX_ITERS and ckpt["nonfinite_steps"] == 1
    assert all(torch.isfinite(w).all() for w in ckpt["model"].values())


def _tiny_tmpfs_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@pytest.mark.parametrize("disk", ["tmpfs", "patched writer"])
def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(data_dir: Path, tmp_path: Path, disk: str) -> None:
    """The second checkpoint does not fit: one error line, exit 2, and the first checkpoint loads."""
    mount, kept = tmp_path / "disk", tmp_path / "kept"
    mount.mkdir()
    run_dir = mount / "run"
    cmd = command(data_dir, run_dir, "train.eval_interval=20")
    if disk == "tmpfs":
        if not _tiny_tmpfs_available():
            pytest.skip("no unprivileged mount namespace here for a tiny tmpfs (the patched writer covers it)")
        # a 600 kB file system, mounted in a private namespace that lives as long as the shell: the debug
        # model's checkpoint is ~370 kB, so the first fits and the second runs out of space
        script = 'mount -t tmpfs -o size=600k tmpfs "$1" && shift && "$@"; rc=$?; cp -a "$RUN" "$KEPT"; exit $rc'
        cmd, env = ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), *cmd], {**os.environ}
        env.update(RUN=str(run_dir), KEPT=str(kept))
    else:
        env = hooked(DISK_FULL_AFTER=1)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if disk != "tmpfs":
        shutil.copytree(run_dir, kept)
    assert result.returncode == 2, result.stderr
    assert re.match(
        r"error: could not write checkpoint .*last\.pt: No space left on device \(free disk space", result.stderr
    ), result.stderr
    assert load_checkpoint(kept / "checkpoints" / "last.pt")["step"] == 20
    assert sorted(p.name for p in (kept / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_a_second_resume_of_a_running_directory_is_refused(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = train_here(data_dir, run_dir, "train.max_iters=10")
    assert first.returncode == 0, first.stderr
    running = start(command(data_dir, run_dir, f"resume={run_dir}"), hooked(STEP_SLEEP=0.2))
    wait_for(lambda: "resuming" in (run_dir / "train.log").read_text())
    second = run_script("train", f"resume={run_dir}")
    assert second.returncode == 2
    assert re.fullmatch(
        rf"error: {run_dir} is in use: pid {running.pid} on \S+ \(since [^)]+\) is training in it \(wait for .*\)\n",
        second.stderr,
    ), second.stderr
    assert "in use" not in (run_dir / "train.log").read_text()  # the refused process wrote nothing there
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=60) == PREEMPTED_EXIT
    assert (run_dir / ".lock").read_text() == ""  # released


def test_a_shard_cut_short_mid_run_is_named(data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shard = data / "shakespeare_char" / "train_000000.bin"
    cmd = command(data, tmp_path / "run")
    result = subprocess.run(cmd, capture_output=True, text=True, env=hooked(TRUNCATE_AT=f"7:{shard}"))
    assert result.returncode == 2
    changed = rf"error: {shard} changed size while in use \([\d,]+ -> [\d,]+ bytes\) \(.+\)\n"
    assert re.fullmatch(changed, result.stderr), result.stderr


def test_shards_that_disappear_or_are_replaced_are_named(data_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "shakespeare_char"
    shutil.copytree(data_dir / "shakespeare_char", data)
    dataset = open_prepared(data)
    val = dataset.splits["val"]
    assert len(val.read(0, 10)) == 10
    shard = data / "val_000000.bin"
    replacement = tmp_path / "copy.bin"
    shutil.copy(shard, replacement)
    os.replace(replacement, shard)
    with pytest.raises(UserError, match=f"{shard} was replaced by another file while in use"):
        val.read(0, 10)
    shard.unlink()
    with pytest.raises(UserError, match=f"{shard} disappeared while in use"):
        val.windows(torch.arange(3).numpy(), 8)


def test_retention_keeps_the_newest_and_every_nth(tmp_path: Path) -> None:
    last = tmp_path / "last.pt"
    for step in range(10, 70, 10):
        save_checkpoint(last, {"step": step})
        keep_step_checkpoint(last, step, keep_last=2, keep_every=20)
    assert step_checkpoints(tmp_path) == [20, 40, 50, 60]
    assert load_checkpoint(tmp_path / "step_50.pt", require=("step",))["step"] == 50
    keep_step_checkpoint(last, 70, keep_last=0, keep_every=None)  # nothing asked: nothing added
    assert step_checkpoints(tmp_path) == [20, 40, 50, 60]


def test_a_held_lock_refuses_and_a_stale_one_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / ".lock").write_text("pid 1234 on gone-host (since 2026-01-01 00:00:00)")  # its holder was killed
    with caplog.at_level("WARNING"):
        held = RunLock(tmp_path).acquire()
    assert "taking over the stale lock of pid 1234 on gone-host" in caplog.text
    with pytest.raises(UserError, match=rf"{tmp_path} is in use: pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()  # another open file description: flock refuses it like another process
    held.release()
    RunLock(tmp_path).acquire().release()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stop_signals=[SIGTERM,SIGKILL]", "train.stop_signals: 'SIGKILL' is not a signal training can catch"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0"),
        ("checkpoint.keep_every=15", "checkpoint.keep_every=15 is not a multiple of train.eval_interval=10"),
        ("train.skip_nonfinite=-2", "train.skip_nonfinite must be >= 0"),
    ],
)
def test_fault_settings_are_validated(override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        train_config(compose_config("train", ["train.eval_interval=10", override]))
