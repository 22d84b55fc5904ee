"""Each modern model option changes the model as intended: shapes, parameter counts, causality, init scale;
GPT-2's defaults keep its parameter names (its weights load); generation with the cache matches without."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from hydragpt.engine.checkpoint import load_checkpoint
from hydragpt.errors import UserError
from hydragpt.model import ACTIVATIONS, GPT, GPTConfig, KVCache, rotary_table, rotate
from hydragpt.sampling import generate, load_model
from hydragpt.train_config import train_config
from tests.helpers import compose_config, run_script, train_debug, training_losses
from tests.test_errors import assert_user_error

SMALL = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32, "vocab_size": 50, "bias": False}
MODERN = {
    "positions": "rope",
    "norm": "rmsnorm",
    "norm_weight": False,
    "qk_norm": True,
    "activation": "relu2",
    "n_kv_head": 2,
    "tie_embeddings": False,
    "logit_softcap": 15.0,
    "zero_init_proj": True,
}


def model(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **options})).eval()


def varied(options: dict) -> GPT:
    """A model whose random weights are scaled up and whose blocks all act: its greedy tokens vary."""
    m = model(**{**options, "zero_init_proj": False})
    with torch.no_grad():
        for weight in (p for p in m.parameters() if p.dim() == 2):
            weight.normal_(0, 4 / weight.shape[1] ** 0.5)
    return m


def shapes(m: GPT) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in m.named_parameters()}


def test_gpt2_defaults_keep_gpt2s_parameters() -> None:
    names = set(shapes(model(bias=True)))
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"} <= names
    assert "lm_head.weight" not in names  # tied to wte: listed once
    assert shapes(model(bias=True))["transformer.h.0.attn.c_attn.weight"] == (3 * 64, 64)


@pytest.mark.parametrize(
    ("option", "changed", "gone"),
    [
        ({"positions": "rope"}, {}, {"wpe.weight"}),
        ({"norm": "rmsnorm"}, {}, set()),
        ({"norm_weight": False}, {}, {"ln_1.weight", "ln_2.weight", "ln_f.weight"}),
        ({"n_kv_head": 1}, {"attn.c_attn.weight": (64 + 2 * 16, 64)}, set()),
        ({"activation": "swiglu"}, {"mlp.c_fc.weight": (2 * 192, 64), "mlp.c_proj.weight": (64, 192)}, set()),
        ({"tie_embeddings": False}, {"lm_head.weight": (50, 64)}, set()),
    ],
)
def test_each_option_changes_the_shapes_it_should(option: dict, changed: dict, gone: set) -> None:
    """Parameters are named by suffix (every layer alike): those `gone`, those `changed` to a shape, and
    every other one as GPT-2's."""
    before, after = shapes(model()), shapes(model(**option))

    def suffix(name: str) -> str:
        return re.sub(r"^transformer\.(h\.\d+\.)?", "", name)

    assert {suffix(n) for n in set(before) - set(after)} == gone
    for name, shape in after.items():
        assert shape == changed.get(suffix(name), before.get(name)), name


def test_parameter_counts() -> None:
    c, v, t, layers = 64, 50, 32, 2
    gpt2_block = 4 * c * c + 8 * c * c + 2 * c  # attention, MLP, two LayerNorm gains (no biases)
    assert model().num_params(non_embedding=False) == v * c + t * c + layers * gpt2_block + c
    assert model(positions="rope").num_params(non_embedding=False) == v * c + layers * gpt2_block + c
    assert model(tie_embeddings=False).num_params(non_embedding=False) == 2 * v * c + t * c + layers * gpt2_block + c
    gqa = model(n_kv_head=1).num_params(non_embedding=False) - model().num_params(non_embedding=False)
    assert gqa == layers * (2 * 16 - 2 * 64) * c  # keys and values: one head of 16 instead of four


@pytest.mark.parametrize("options", [{}, MODERN, {**MODERN, "activation": "swiglu", "norm_weight": True}])
def test_a_position_never_sees_the_future(options: dict) -> None:
    m = model(**{**options, "zero_init_proj": False})
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    with torch.no_grad():
        a, _ = m(idx)
        b, _ = m(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-5) and not torch.allclose(a[:, 12:], b[:, 12:])


def test_init_scales() -> None:
    zero = model(zero_init_proj=True)
    assert all(p.abs().max() == 0 for n, p in zero.named_parameters() if n.endswith("c_proj.weight"))
    scaled = model()
    std = torch.cat([p.flatten() for n, p in scaled.named_parameters() if n.endswith("c_proj.weight")]).std()
    assert std.item() == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.1)


def test_logit_softcap_bounds_the_logits() -> None:
    m = model(logit_softcap=2.0)
    with torch.no_grad():
        m.lm_head.weight.mul_(100)
        logits, _ = m(torch.randint(0, 50, (1, 8)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9


def test_rotary_scores_depend_on_distance_only() -> None:
    """A query at position p and a key at position p - 2 score the same wherever p is."""
    config = GPTConfig(**SMALL, positions="rope")
    cos, sin = rotary_table(config, torch.arange(32))
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(p_q: int, p_k: int) -> float:
        return (rotate(q, cos[p_q], sin[p_q]) * rotate(k, cos[p_k], sin[p_k])).sum().item()

    assert score(3, 1) == pytest.approx(score(29, 27), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(3, 0), abs=1e-4)


@pytest.mark.parametrize("options", [MODERN, {**MODERN, "activation": "swiglu", "positions": "learned"}])
def test_cached_and_uncached_greedy_generation_agree_past_block_size(options: dict) -> None:
    """Random weights scaled up (so that the tokens vary), a RoPE + GQA model and a learned-position one:
    more than two blocks past block_size 32, the cached tokens are the recomputed ones."""
    m = varied(options)
    prompt = torch.randint(0, 50, (2, 5))
    runs = [
        torch.cat(list(generate(m, prompt, 80, temperature=0.0, use_cache=use_cache)), dim=1)
        for use_cache in (True, False)
    ]
    assert len(set(runs[0][0].tolist())) > 10
    assert torch.equal(runs[0], runs[1])


def test_a_rotary_cache_slides_past_block_size_with_one_prefill() -> None:
    """With RoPE the window slides: after the prompt's prefill every step feeds one token, whose logits
    are those of the last n_layer * (block_size - 1) + 1 tokens recomputed with sliding attention."""
    m = varied(MODERN)
    calls: list[int] = []
    m.register_forward_pre_hook(lambda _, args, kwargs: calls.append(args[0].size(1)), with_kwargs=True)
    tokens = torch.cat(list(generate(m, torch.randint(0, 50, (1, 5)), 70, temperature=0.0)), dim=1)
    assert calls == [5] + [1] * 69  # 75 positions, block_size 32: never a second prefill
    cache = KVCache(2, 32)
    sequence = torch.cat((torch.randint(0, 50, (1, 5)), tokens), dim=1)
    m(sequence[:, :32], cache=cache)
    for t in range(32, 75):
        cached, _ = m(sequence[:, t : t + 1], cache=cache)
        recomputed, _ = m(sequence[:, max(0, t - 2 * 31) : t + 1])
        torch.testing.assert_close(cached[0, -1], recomputed[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):  # past the block, one token at a time
        m(sequence[:, :2], cache=cache)


def test_bad_option_values_are_refused() -> None:
    with pytest.raises(ValueError, match="n_kv_head=3 does not divide"):
        GPTConfig(**{**SMALL, "n_kv_head": 3})
    with pytest.raises(ValueError, match=r"unknown model\.positions 'alibi'"):
        GPTConfig(**{**SMALL, "positions": "alibi"})
    with pytest.raises(ValueError, match="needs an even head size"):
        GPTConfig(**{**SMALL, "n_embd": 60, "n_head": 4, "positions": "rope"})


# Each two-valued option with GPT-2's value first, and the four MLPs.
TWO_WAY = {
    "positions": ["learned", "rope"],
    "norm": ["layernorm", "rmsnorm"],
    "norm_weight": [True, False],
    "qk_norm": [False, True],
    "n_kv_head": [None, 1],
    "tie_embeddings": [True, False],
    "logit_softcap": [None, 15.0],
    "zero_init_proj": [False, True],
    "bias": [True, False],
}


def combinations() -> list[dict]:
    """Ten models in which every two options meet in every pair of their values (a covering array), where
    all 2^9 x 4 combinations would be 2048. Base row k gives option f the k-th bit of f + 1: no two
    options get the same bits or opposite ones, so each pair of options agrees in some base row and
    differs in another; each base row also runs with every option flipped, so every pair of values meets."""
    rows = []
    for k in range(5):
        for flip in (0, 1):
            row = {name: values[((f + 1) >> k & 1) ^ flip] for f, (name, values) in enumerate(TWO_WAY.items())}
            rows.append({**row, "activation": ACTIVATIONS[k % 4]})
    return rows


def test_the_combinations_cover_every_pair_of_option_values() -> None:
    rows, options = combinations(), {**TWO_WAY, "activation": list(ACTIVATIONS)}
    for a, b in itertools.combinations(options, 2):
        met = {(row[a], row[b]) for row in rows}
        assert met == set(itertools.product(options[a], options[b])), (a, b)


def as_overrides(row: dict) -> list[str]:
    return [f"model.{k}={'null' if v is None else str(v).lower()}" for k, v in row.items()]


@pytest.mark.parametrize(
    "index", [i if i < 2 else pytest.param(i, marks=pytest.mark.slow) for i in range(len(combinations()))]
)
def test_each_combination_trains_resumes_exactly_and_samples_with_and_without_cache(
    index: int, data_dir: Path, tmp_path: Path
) -> None:
    """The first two (each other's opposite: between them every value of every option) run in the fast
    suite. A run of 2 steps resumed to 4 has the losses of a straight run of 4; its checkpoint
    generates the same greedy tokens with and without the KV cache, well past block_size."""
    row = combinations()[index]
    common = [*as_overrides(row), "lr=constant", "train.eval_interval=2", "model.dropout=0.1"]
    first = train_debug(data_dir, tmp_path / "run", *common, "train.max_iters=2")
    assert first.returncode == 0, first.stderr
    resumed = run_script("train", f"resume={tmp_path / 'run'}", "train.max_iters=4")
    assert resumed.returncode == 0, resumed.stderr
    straight = train_debug(data_dir, tmp_path / "straight", *common, "train.max_iters=4")
    assert straight.returncode == 0, straight.stderr
    losses = [training_losses(tmp_path / name) for name in ("run", "straight")]
    assert losses[0] == losses[1] and sorted(losses[0]) == [0, 1, 2, 3]

    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 4 and {k: ckpt["model_config"][k] for k in row} == row
    m, _ = load_model(ckpt, torch.device("cpu"))
    prompt = torch.randint(0, m.config.vocab_size, (2, 5))
    cached, recomputed = (
        torch.cat(list(generate(m, prompt, 80, temperature=0.0, use_cache=use_cache)), dim=1)
        for use_cache in (True, False)
    )
    assert torch.equal(cached, recomputed)  # 85 positions, block_size 32


def test_export_names_the_first_knob_llama_lacks(train_run, tmp_path: Path) -> None:
    trained = train_run(*as_overrides(combinations()[0]), "train.max_iters=2", "train.eval_interval=2")
    assert trained.returncode == 0, trained.stderr
    exported = run_script("export", f"ckpt={tmp_path / 'run'}", f"out={tmp_path / 'hf'}")
    assert_user_error(exported, "which Llama has no equivalent for", "model.")
    assert not (tmp_path / "hf").exists()


def test_the_depth_dial_shapes_the_depth_flavour_and_nothing_else() -> None:
    deep = train_config(compose_config("train", ["model=modern_gpu", "model.depth=20"])).model
    assert (deep.n_layer, deep.n_embd, deep.n_head, deep.positions) == (20, 1280, 10, "rope")
    with pytest.raises(UserError, match=r"model\.depth=20 but model\.n_layer=12"):
        train_config(compose_config("train", ["model=gpt2_small", "model.depth=20"]))
    with pytest.raises(UserError, match=r"model\.depth=20 but model\.n_layer=4"):
        train_config(compose_config("train", ["model=modern_gpu", "model.depth=20", "model.n_layer=4"]))
