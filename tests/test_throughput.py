"""The throughput levers: train.batch_size=auto (the largest micro-batch that fits),
system.activation_checkpointing, system.dtype=auto's measured choice on CPUs, and AdamW's fused kernel."""

from __future__ import annotations

import contextlib
import re
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from hydragpt.engine.batch_size import (
    cpu_memory_limit,
    is_out_of_memory,
    largest_micro_batch,
    micro_batch_candidates,
)
from hydragpt.engine.optim import AdamW
from hydragpt.engine.system import bf16_pays_on_cpu, checkpoint_activations, resolve_dtype
from hydragpt.errors import UserError
from hydragpt.model import GPT, GPTConfig
from hydragpt.procfs import proc_kib_field
from tests.helpers import run_script

# Address space granted above the forked training process's start: ~8 of the 64 sequences fit in it (each
# holds ~32 MB of logits and their gradients), so the search must stop well short of a whole step's
BUDGET = 600 * 2**20
SMALL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)


def test_the_candidates_divide_a_ranks_sequences_per_step() -> None:
    assert micro_batch_candidates(12) == [1, 2, 3, 4, 6, 12]
    assert micro_batch_candidates(7) == [1, 7]


@pytest.mark.parametrize("limit, expected", [(5, 4), (24, 24), (1, 1), (13, 12)])
def test_the_search_finds_the_largest_candidate_that_fits(limit: int, expected: int) -> None:
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= limit

    chosen = largest_micro_batch(GPT(SMALL), 24, 16, torch.device("cpu"), torch.float32, fits)
    assert chosen == expected
    assert len(tried) <= 4  # a binary search over the 8 divisors of 24, not a walk
    assert expected in tried and all(size > expected for size in tried if size > limit)


def test_nothing_fitting_is_one_error_that_names_the_ways_out() -> None:
    with pytest.raises(UserError) as error:
        largest_micro_batch(GPT(SMALL), 8, 16, torch.device("cpu"), torch.float32, lambda size: False)
    assert "not even one sequence of 16 tokens fits" in str(error.value)
    assert "system.activation_checkpointing=true" in error.value.fix


def test_the_search_leaves_the_random_state_and_the_gradients_as_they_were() -> None:
    model = GPT(SMALL)
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert largest_micro_batch(model, 4, 16, torch.device("cpu"), torch.float32) == 4  # trial passes, no limit hit
    assert torch.equal(torch.rand(3), expected)
    assert all(p.grad is None for p in model.parameters())


def test_the_cpu_allocators_refusal_counts_as_out_of_memory() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with _address_space_budget(2**28), pytest.raises(RuntimeError) as error:
        torch.empty(2**34, dtype=torch.uint8)
    assert resource.getrlimit(resource.RLIMIT_AS) == (soft, hard)
    assert is_out_of_memory(error.value)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@contextlib.contextmanager
def _address_space_budget(extra: int) -> Iterator[None]:
    """An address-space limit `extra` bytes above what this process maps now (inherited by its forks)."""
    in_use = proc_kib_field(Path("/proc/self/status"), "VmSize")
    assert in_use is not None
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_batch_size_auto_trains_with_the_largest_micro_batch_under_a_memory_limit(
    data_dir: Path, tmp_path: Path
) -> None:
    """A small model with a large (padded) vocabulary: its logits make each sequence cost much memory and
    little compute. Under an address-space limit the search stops short of the 64 sequences of a step, and
    training runs at the size found, with the accumulation derived from it."""
    run_dir = tmp_path / "run"
    with _address_space_budget(BUDGET):
        result = run_script(
            "train",
            "experiment=debug",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={run_dir}",
            "model.vocab_size=32768",
            "model.block_size=64",
            "train.batch_size=auto",
            f"train.total_batch_size={64 * 64}",
            "train.grad_accum_steps=null",
            "train.max_iters=2",
            "train.eval_interval=2",
        )
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = {
        int(size): fit == "fit"
        for size, fit in re.findall(r"batch_size=auto: (\d+) sequences of 64 tokens (fit|do not fit)", result.stdout)
    }
    found = re.search(r"batch_size=auto: (\d+) sequences per micro-batch of the 64", result.stdout)
    assert found is not None, result.stderr
    chosen = int(found.group(1))
    assert 1 < chosen < 64, verdicts
    assert verdicts[chosen] and not verdicts[2 * chosen]  # the largest power-of-two divisor of 64 that fit
    assert f"batch {chosen} x block 64 x accumulation {64 // chosen}" in result.stdout
    recorded = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert recorded["train"]["batch_size"] == chosen  # and so a resume trains on with it


def test_batch_size_auto_needs_the_tokens_per_step(train_run) -> None:  # type: ignore[no-untyped-def]
    result = train_run("train.batch_size=auto")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train.batch_size=auto needs train.total_batch_size: the accumulation is derived from it"
        " (set the tokens per optimizer step, e.g. train.total_batch_size=524288)"
    )


def _saved_bytes_and_grads(model: GPT, tokens: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    assert loss is not None
    loss.backward()
    return saved, [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_keeps_less_for_the_backward_and_gives_the_same_gradients() -> None:
    config = GPTConfig(n_layer=4, n_head=2, n_embd=64, block_size=32, vocab_size=65, dropout=0.1)
    torch.manual_seed(0)
    plain = GPT(config)
    recomputing = GPT(config)
    recomputing.load_state_dict(plain.state_dict())
    checkpoint_activations(recomputing)
    tokens = torch.randint(65, (4, 33))
    torch.manual_seed(1)
    kept, grads = _saved_bytes_and_grads(plain, tokens)
    torch.manual_seed(1)
    kept_recomputing, grads_recomputing = _saved_bytes_and_grads(recomputing, tokens)
    assert kept_recomputing < kept / 3
    for expected, got in zip(grads, grads_recomputing, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # dropout masks replayed too
    assert list(recomputing.state_dict()) == list(plain.state_dict())  # checkpoints keep their keys


def _timer(float32: float, bfloat16: float):  # type: ignore[no-untyped-def]
    """A stand-in for timing: the float32 matmul takes `float32` seconds, the bfloat16 one (casts) `bfloat16`."""
    calls: list[int] = []

    def seconds(run) -> float:  # type: ignore[no-untyped-def]
        calls.append(1)
        return float32 if len(calls) == 1 else bfloat16

    return seconds


@pytest.mark.parametrize("float32, bfloat16, expected", [(3.0, 1.0, True), (1.2, 1.0, False), (1.0, 4.0, False)])
def test_dtype_auto_on_a_cpu_takes_bfloat16_only_where_it_measures_enough_faster(
    float32: float, bfloat16: float, expected: bool
) -> None:
    assert bf16_pays_on_cpu(256, 64, seconds=_timer(float32, bfloat16)) is expected


def test_dtype_auto_on_a_cpu_measures_and_explicit_dtypes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32  # nothing to measure (sampling, evaluation)
    monkeypatch.setattr("hydragpt.engine.system.bf16_pays_on_cpu", lambda rows, width: True)
    assert resolve_dtype("auto", cpu, matmul=(4096, 384)) == torch.bfloat16
    assert resolve_dtype("float32", cpu, matmul=(4096, 384)) == torch.float32
    monkeypatch.setattr("hydragpt.engine.system.bf16_pays_on_cpu", lambda rows, width: False)
    assert resolve_dtype("auto", cpu, matmul=(4096, 384)) == torch.float32


def test_adamw_takes_its_fused_kernel_on_cpus_unless_told_otherwise() -> None:
    model = GPT(SMALL)
    assert AdamW().build(model, torch.device("cpu"))[0].defaults["fused"] is True
    assert AdamW(fused=False).build(model, torch.device("cpu"))[0].defaults["fused"] is False


def test_ranks_on_one_machine_share_its_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    if resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY:
        pytest.skip("an address-space limit is already set: the search uses it as it is")
    alone = cpu_memory_limit()
    assert alone is not None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    shared = cpu_memory_limit()
    assert shared is not None and shared < alone  # in use now, plus a quarter of what is available
