"""torchrun: 2 CPU ranks (gloo) train like 1 process with twice the accumulation, in one run directory,
and a failing rank ends the job instead of hanging it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import DEBUG_RUN, REPO, run_script, torchrun


def losses(run_dir: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


# Muon orthogonalises each update in bfloat16 (torch.optim.Muon's Newton-Schulz), which turns the last-bit
# differences between averaging over ranks and accumulating in one process into ~1e-4 of the loss.
TOLERANCE = {"adamw": 1e-5, "muon": 1e-3}


def assert_near(actual: torch.Tensor, expected: torch.Tensor, optim: str, rtol: float, atol: float) -> None:
    """Element by element for AdamW. Muon's bfloat16 orthogonalisation moves single elements far more than
    whole tensors: within 5% of the tensor's norm (another parameter's tensor would be 100% off or more)."""
    if optim == "adamw":
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    else:
        assert torch.linalg.vector_norm(actual - expected) <= 0.05 * torch.linalg.vector_norm(expected)


@pytest.mark.parametrize(
    ("sampling", "optim"),
    [  # Muon under torchrun stays in the fast suite with FSDP (below)
        ("random", "adamw"),
        pytest.param("random", "muon", marks=pytest.mark.slow),
        pytest.param("sequential", "adamw", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_follow_one_process_with_twice_the_accumulation(
    data_dir: Path, tmp_path: Path, sampling: str, optim: str
) -> None:
    common = [
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "train.max_iters=20",
        "train.eval_interval=10",
        f"data.sampling={sampling}",
        f"optim={optim}",
    ]
    result = torchrun(2, *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (two_ranks,) = (tmp_path / "outputs").glob("*/*")  # exactly one run directory for the whole job
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # nothing stray where it was launched
    one = run_script(
        "train",
        *common,
        "train.grad_accum_steps=2",
        f"hydra.run.dir={tmp_path / 'one'}",
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    (train_2, val_2), (train_1, val_1) = losses(two_ranks), losses(tmp_path / "one")
    rel = TOLERANCE[optim]
    assert len(train_2) == 20 and train_2 == pytest.approx(train_1, rel=rel) and val_2 == pytest.approx(val_1, rel=rel)
    log = (two_ranks / "train.log").read_text()
    assert "256 tokens per step (batch 4 x block 32 x accumulation 1 x 2 ranks)" in log
    assert "[rank 1]" not in result.stdout  # other ranks log warnings only


@pytest.mark.slow  # fast: bitwise resume in test_faults (SIGTERM, 1 process), a new world size below
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_resume_is_exact_on_two_ranks_and_may_change_the_world_size(data_dir: Path, tmp_path: Path, optim: str) -> None:
    common = [*DEBUG_RUN, f"paths.data_dir={data_dir}", "train.eval_interval=10", "lr.decay_iters=20", f"optim={optim}"]
    straight, resumed, regrouped = tmp_path / "straight", tmp_path / "resumed", tmp_path / "regrouped"
    assert torchrun(2, *common, "train.max_iters=20", f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    for run in (resumed, regrouped):
        assert torchrun(2, *common, "train.max_iters=10", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    assert torchrun(2, f"resume={resumed}", "train.max_iters=20", cwd=tmp_path).returncode == 0
    one = run_script(  # the rest of the run on 1 process, accumulating what the 2 ranks did
        "train",
        f"resume={regrouped}",
        "train.max_iters=20",
        "train.grad_accum_steps=2",
        cwd=tmp_path,
    )
    assert one.returncode == 0, one.stderr
    expected = losses(straight)[0]
    assert len(expected) == 20 and losses(resumed)[0] == expected
    assert losses(regrouped)[0] == pytest.approx(expected, rel=TOLERANCE[optim])


def test_a_two_rank_run_resumes_on_one_process(data_dir: Path, tmp_path: Path) -> None:
    """1 process accumulating what 2 ranks did continues their run like 2 ranks would (to float rounding)."""
    common = [*DEBUG_RUN, f"paths.data_dir={data_dir}", "train.eval_interval=5", "lr.decay_iters=10"]
    two, one = tmp_path / "two", tmp_path / "one"
    assert torchrun(2, *common, "train.max_iters=5", f"hydra.run.dir={two}", cwd=tmp_path).returncode == 0
    resumed = run_script("train", f"resume={two}", "train.max_iters=10", "train.grad_accum_steps=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "tokens per step change" not in resumed.stderr  # 4 x 32 x 2 ranks = 4 x 32 x 2 micro-steps
    single = run_script("train", *common, "train.max_iters=10", "train.grad_accum_steps=2", f"hydra.run.dir={one}")
    assert single.returncode == 0, single.stderr
    (resumed_losses, _), (expected, _) = losses(two), losses(one)
    assert len(resumed_losses) == 10 and resumed_losses == pytest.approx(expected, rel=1e-5)


def test_a_failing_rank_ends_the_job(data_dir: Path, tmp_path: Path) -> None:
    """Rank 1 raises at iteration 5: the job exits non-zero well within ddp.timeout + 30 s, no hang."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    from hydragpt.engine import trainer\n"
        "    step = trainer.Trainer.train_step\n"
        "    def failing(self):\n"
        "        if self.step == 5:\n"
        "            raise RuntimeError('injected failure at iteration 5')\n"
        "        return step(self)\n"
        "    trainer.Trainer.train_step = failing\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "inject")}
    start = time.monotonic()
    result = torchrun(
        2,
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "train.max_iters=1000",
        "ddp.timeout=30",
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode != 0
    assert time.monotonic() - start < 30 + 30
    assert "injected failure at iteration 5" in result.stderr


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("ddp=none", "error: launched as 2 processes but ddp=none runs a single process"),
        ("-m", "error: a multirun (-m) cannot run under torchrun"),
    ],
)
def test_refused_under_torchrun(data_dir: Path, tmp_path: Path, argument: str, message: str) -> None:
    """A mistake every rank makes alike (-m, before Hydra starts) is printed once, by rank 0; one a rank
    meets while running (ddp=none) by rank 0, and by any other rank that prints it before torchrun stops
    it, tagged [rank N]."""
    common = (*DEBUG_RUN, f"paths.data_dir={data_dir}", f"paths.output_dir={tmp_path / 'outputs'}")
    result = torchrun(2, argument, *common, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error: " in line and "ChildFailedError" not in line]
    untagged = [line for line in errors if line.startswith("error: ")]
    assert len(untagged) == 1 and untagged[0].startswith(message), result.stderr
    assert all(line.startswith(("error: ", "[rank 1] error: ")) for line in errors)
    assert len(errors) == 1 or argument != "-m"
    assert not (tmp_path / "outputs").exists() or argument == "ddp=none"


@pytest.mark.slow
def test_twenty_launches_make_twenty_run_directories(data_dir: Path, tmp_path: Path) -> None:
    for _ in range(20):
        result = torchrun(
            2,
            *DEBUG_RUN,
            f"paths.data_dir={data_dir}",
            f"paths.output_dir={tmp_path / 'outputs'}",
            "train.max_iters=2",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 20 and all(len(list(run.glob("train.log"))) == 1 for run in runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]


@pytest.mark.slow
def test_two_node_rendezvous_on_loopback(data_dir: Path, tmp_path: Path) -> None:
    """Two torchrun agents, one process each, meet through c10d on 127.0.0.1: a 2-node job on one machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback",
        str(REPO / "scripts" / "train.py"), *DEBUG_RUN, f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}", "train.max_iters=10", "train.eval_interval=5",
    ]  # fmt: skip
    nodes = [subprocess.Popen(agent, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    nodes.append(subprocess.Popen(agent, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    (run,) = (tmp_path / "outputs").glob("*/*")
    steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 10 and "x 2 ranks" in (run / "train.log").read_text()


@pytest.mark.parametrize("master_port", [None, "29555"])
def test_slurm_tasks_become_ranks(monkeypatch: pytest.MonkeyPatch, master_port: str | None) -> None:
    """Under Hydra's submitit launcher each SLURM task is a rank: SLURM's variables give torchrun's (and a
    MASTER_PORT the cluster exported is kept)."""
    from hydragpt.engine.distributed import DistEnv, launched_env

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")  # so that what launched_env exports is undone after the test
        monkeypatch.delenv(name)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_NODEID": "1",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
    }
    if master_port:
        slurm["MASTER_PORT"] = master_port
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert launched_env() == DistEnv(rank=11, local_rank=3, world_size=16)
    assert os.environ["MASTER_ADDR"] == "gpu07"
    assert os.environ["MASTER_PORT"] == master_port if master_port else 20000 <= int(os.environ["MASTER_PORT"]) <= 60000


def test_slurm_launcher_config_composes() -> None:
    """`--cfg all` (the job's and Hydra's config; `--cfg hydra` alone cannot resolve ${paths.output_dir})."""
    result = run_script(
        "train",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.partition=gpu",
        "--cfg",
        "all",
        "--resolve",
        timeout=120,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["partition"]) == (2, "gpu")
    assert launcher["tasks_per_node"] == launcher["gpus_per_node"] == 8  # one rank per GPU


@pytest.mark.slow  # the mapping itself is test_slurm_tasks_become_ranks; this runs it end to end
def test_submitit_tasks_train_like_torchrun_ranks(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep job run by submitit as 2 tasks (its local executor stands in for SLURM) trains exactly as
    the same run under torchrun with 2 ranks: the tasks found their ranks and each other. A fresh
    interpreter: submitit pickles the job for processes of its own, which must not need pytest's modules."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as torchrun sets it for its ranks
    common = [
        *DEBUG_RUN,
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "train.max_iters=6",
        "train.eval_interval=3",
    ]
    result = run_script(
        "train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.timeout_min=10",
        *common,
        "optim.lr=1e-2",
        cwd=tmp_path,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    log = (sweep / "0" / "train.log").read_text()
    assert "x 2 ranks" in log and "[rank 1]" not in log
    assert torchrun(2, *common, "optim.lr=1e-2", "hydra.run.dir=ranks", cwd=tmp_path).returncode == 0
    (train_tasks, val_tasks), (train_ranks, val_ranks) = losses(sweep / "0"), losses(tmp_path / "ranks")
    assert train_tasks == pytest.approx(train_ranks, rel=1e-6) and val_tasks == pytest.approx(val_ranks, rel=1e-6)


@pytest.mark.parametrize("optim", [pytest.param("adamw", marks=pytest.mark.slow), "muon"])
def test_fsdp_trains_like_one_process_and_its_checkpoint_is_the_usual_file(
    data_dir: Path, tmp_path: Path, optim: str
) -> None:
    """ddp=fsdp on 2 ranks: the losses of 1 process with twice the accumulation, an exact resume from the
    gathered checkpoint (interrupted at iter 10), and a checkpoint that sample.py and 1 process read.
    3 eval batches over 2 ranks: one rank runs a forward that does not count, so neither waits forever.
    Muon (AdamW for its embeddings and vectors) covers both optimizers: its Newton-Schulz needs each sharded
    matrix whole, and its AdamW group's state is sharded like plain AdamW's."""
    common = [*DEBUG_RUN, f"paths.data_dir={data_dir}", "train.eval_interval=10", "lr.decay_iters=20"]
    common += [f"optim={optim}"]
    common += ["train.eval_iters=3", "ddp.timeout=60"]
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    assert (
        torchrun(2, *common, "ddp=fsdp", "train.max_iters=10", f"hydra.run.dir={sharded}", cwd=tmp_path).returncode == 0
    )
    resumed = torchrun(2, f"resume={sharded}", "train.max_iters=20", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = run_script(
        "train",
        *common,
        "train.max_iters=20",
        "train.grad_accum_steps=2",
        f"hydra.run.dir={one}",
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr
    (train_sharded, val_sharded), (train_one, val_one) = losses(sharded), losses(one)
    rel = TOLERANCE[optim]
    assert len(train_sharded) == 20 and train_sharded == pytest.approx(train_one, rel=rel)
    assert val_sharded == pytest.approx(val_one, rel=rel)

    ckpt = torch.load(sharded / "checkpoints" / "last.pt", weights_only=True)
    reference = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    assert list(ckpt["model"]) == list(reference["model"])  # plain names, full shapes
    for name, weight in reference["model"].items():
        assert_near(ckpt["model"][name], weight, optim, rtol=1e-4, atol=1e-6)
    assert len(ckpt["optimizers"]) == len(reference["optimizers"]) == {"adamw": 1, "muon": 2}[optim]
    for saved, expected in zip(ckpt["optimizers"], reference["optimizers"], strict=True):
        assert saved["state"].keys() == expected["state"].keys()  # the same parameter behind each index
        for index, state in expected["state"].items():
            for key, value in state.items():  # exp_avg, exp_avg_sq, step; Muon's momentum_buffer
                assert_near(saved["state"][index][key], value, optim, rtol=1e-3, atol=1e-8)
    sampled = run_script("sample", f"ckpt={sharded}", "max_new_tokens=20", "num_samples=1", cwd=tmp_path)
    assert sampled.returncode == 0 and len(sampled.stdout.strip()) >= 20, sampled.stderr
