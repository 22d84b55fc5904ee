"""Sampling: reproducible under a seed, greedy at temperature 0, prompt files, token filtering, and the KV
cache computing what recomputing the context computes."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydragpt.engine.checkpoint import load_checkpoint
from hydragpt.model import GPT, GPTConfig, KVCache
from hydragpt.sampling import (
    SEPARATOR,
    Settings,
    complete,
    generate,
    latest_checkpoint,
    load_model,
    next_token,
    window_start,
)
from tests.helpers import REPO, run_script


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


def test_cached_logits_equal_the_full_forward() -> None:
    """Prefill then one token at a time through the KV cache gives the logits of the whole sequence."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=11, bias=True)).eval()
    idx = torch.randint(11, (3, 16))
    full, _ = model(idx)
    cache = KVCache(2, 16)
    prefill, _ = model(idx[:, :5], cache=cache)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat([prefill, *steps], dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(idx[:, :1], cache=cache)


def test_window_restarts_from_the_last_half_block() -> None:
    assert [window_start(n, 8) for n in (1, 8, 9, 12, 13, 16, 17)] == [0, 0, 4, 4, 8, 8, 12]
    assert all(n - window_start(n, 8) <= 8 for n in range(1, 100))


@pytest.mark.parametrize(
    ("n_layer", "n_embd", "block_size"),
    [(2, 64, 64), pytest.param(6, 384, 256, marks=pytest.mark.slow)],  # a small model, and baby_char's shape
)
def test_cached_and_uncached_greedy_agree_past_block_size(n_layer: int, n_embd: int, block_size: int) -> None:
    """Random weights scaled up (so the tokens vary instead of repeating one), generating past the block
    for more than a block: both paths re-prefill the same windows and pick the same tokens."""
    torch.manual_seed(0)
    shape = GPTConfig(n_layer=n_layer, n_head=n_layer, n_embd=n_embd, block_size=block_size, vocab_size=65, bias=False)
    model = GPT(shape).eval()
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 2 / weight.shape[1] ** 0.5)
    prompt = torch.randint(65, (1, 16))
    new_tokens = block_size - 16 + block_size + block_size // 5
    cached, uncached = (
        torch.cat(list(generate(model, prompt, new_tokens, temperature=0, use_cache=use_cache)), dim=1)
        for use_cache in (True, False)
    )
    assert cached.shape == (1, new_tokens) and len(set(cached[0].tolist())) > 10
    assert torch.equal(cached, uncached)


@pytest.mark.slow  # fast: the same agreement in-process above, and bench_sample.py's check of it below
def test_sample_script_with_and_without_cache(trained_run: Path) -> None:
    with_cache = sample(trained_run, "temperature=0", "num_samples=2", "max_new_tokens=100", "use_cache=true")
    assert sample(trained_run, "temperature=0", "num_samples=2", "max_new_tokens=100", "use_cache=false") == with_cache


def test_sampling_benchmark_reports_both_modes() -> None:
    result = run_script("bench_sample", "model=debug", "max_new_tokens=40", "repeats=1", "batch_sizes=[1,3]")
    assert result.returncode == 0, result.stderr
    for batch in (1, 3):
        assert f"| 1 | {batch} | kv cache |" in result.stdout and f"| 1 | {batch} | recompute |" in result.stdout
        # its medians, the speed-up, and identical greedy tokens
        assert re.search(rf"^\| {batch} \| [\d,]+ \| [\d,]+ \| [\d.]+x \| yes \|$", result.stdout, re.MULTILINE)


def test_stop_strings_jsonl_and_an_output_file(trained_run: Path, tmp_path: Path) -> None:
    """The same samples as without stop strings, each cut just before the first one."""
    common = (f"ckpt={trained_run}", "start=ROMEO:", "num_samples=3", "max_new_tokens=60", "format=jsonl")
    whole = [json.loads(line) for line in run_script("sample", *common).stdout.splitlines()]
    stop = [whole[0]["completion"][20], whole[1]["completion"][30]]  # characters these samples do produce
    out = tmp_path / "samples.jsonl"
    result = run_script("sample", *common, f"stop=[{stop[0]!r},{stop[1]!r}]", f"out={out}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert out.read_text() == result.stdout and [r["sample"] for r in records] == [0, 1, 2]
    for cut, full in zip(records, whole, strict=True):
        assert cut["prompt"] == "ROMEO:" and cut["text"] == "ROMEO:" + cut["completion"]
        ends = [full["completion"].find(s) for s in stop if s in full["completion"]]
        assert cut["completion"] == full["completion"][: min(ends, default=60)]
    assert len(records[0]["completion"]) <= 20


def test_chat_through_a_pipe(trained_run: Path) -> None:
    """Two prompts, settings changed in between, then quit; the greedy answer is sample.py's."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "sample.py"), f"ckpt={trained_run}", "chat=true", "max_new_tokens=15"],
        input="ROMEO:\ntemp 0\ntokens 20\nJULIET:\ntemp -1\nquit\nnever read\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 15
    greedy = sample(trained_run, "temperature=0", "num_samples=1", "max_new_tokens=20", "start=JULIET:")
    assert second + "\n" == greedy[0]
    assert "temperature: 0.0" in result.stderr and "error: temperature must be a number >= 0, got -1.0" in result.stderr


def test_newline_stop_and_streaming_never_shows_a_stop(trained_run: Path) -> None:
    """stop=['\\n'] on the command line means a newline; streamed pieces add up to the answer, which
    never contains a stop string, even one completed only by a later token."""
    whole = sample(trained_run, "temperature=0", "num_samples=1", "max_new_tokens=200", "start=ROMEO:")[0]
    cut = sample(trained_run, "temperature=0", "num_samples=1", "max_new_tokens=200", "start=ROMEO:", "stop=['\\n']")
    completion = whole.removeprefix("ROMEO:")
    assert cut[0] == "ROMEO:" + completion[: completion.find("\n")] + "\n"  # print adds one newline

    model, tokenizer = load_model(load_checkpoint(trained_run), torch.device("cpu"))
    stop = [completion[5:8], "\n\n"]  # three characters the model does produce (first seen at 5 or before)
    pieces: list[str] = []
    settings = Settings(100, 0.0, None, None, stop, True)
    generator = torch.Generator().manual_seed(0)
    (answer,) = complete(
        model, tokenizer, [tokenizer.encode("ROMEO:")], settings, generator, torch.float32, pieces.append
    )
    expected = completion[: min(completion.find(s) for s in stop if s in completion)]
    assert "".join(pieces) == answer == expected


@pytest.mark.parametrize(
    "positions, backend",
    [
        ("rope", "eager"),
        ("learned", "eager"),
        pytest.param("rope", "inductor", marks=pytest.mark.slow),
        pytest.param("learned", "inductor", marks=pytest.mark.slow),
    ],
)
def test_a_compiled_decode_step_gives_the_eager_tokens_and_compiles_once(
    positions: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the block (rotary: the sliding ring; learned: the window's jumps and new prefills), greedy tokens
    equal the eager cache's, and a second generation reuses the compiled step. Whether a step's shapes stay
    fixed is TorchDynamo's to judge, which the fast cases ask without compiling kernels (backend=eager);
    the slow ones compile them with Inductor, as sample.py does."""
    from torch._dynamo.utils import counters

    if backend != "inductor":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))

    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0, positions=positions)
    torch.manual_seed(0)
    model = GPT(config).eval()
    prompts = torch.randint(65, (3, 5))
    eager = torch.cat(list(generate(model, prompts, 40, temperature=0.0)), dim=1)
    before = counters["stats"]["unique_graphs"]
    compiled = torch.cat(list(generate(model, prompts, 40, temperature=0.0, compile=True)), dim=1)
    assert torch.equal(compiled, eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before <= 2  # one step's graph (two where it breaks), not one per length
    again = torch.cat(list(generate(model, prompts, 40, temperature=0.0, compile=True)), dim=1)
    assert torch.equal(again, eager) and counters["stats"]["unique_graphs"] == graphs  # no recompilation
