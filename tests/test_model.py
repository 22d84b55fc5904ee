"""The GPT model: shapes, initial loss, weight tying, init scale, cropping, weight-decay groups, MFU."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hydragpt.config import GPTConfig, LRConfig, OptimConfig
from hydragpt.engine.metrics import mfu, peak_flops
from hydragpt.engine.optim import build_optimizer, lr_factor
from hydragpt.model import GPT

CFG = GPTConfig(name="t", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0, bias=True)


def test_logits_shape_and_loss_at_init_is_uniform() -> None:
    torch.manual_seed(0)
    model = GPT(CFG)
    idx, targets = torch.randint(0, 65, (2, 8, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (8, 16, 65)
    # small init: the first prediction is close to uniform over the vocabulary
    assert loss is not None and abs(loss.item() - math.log(65)) < 0.05
    assert model(idx)[1] is None


def test_longer_than_block_size_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        GPT(CFG)(torch.zeros(1, 17, dtype=torch.long))


def test_weight_tying_shares_one_matrix() -> None:
    model = GPT(CFG)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" in model.state_dict() and "transformer.wte.weight" in model.state_dict()


def test_residual_projections_use_scaled_init() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=8, vocab_size=100))
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(proj_std - 0.02 / math.sqrt(2 * 8)) < 5e-4
    assert abs(fc_std - 0.02) < 5e-4


def test_bias_flag() -> None:
    names = {n for n, _ in GPT(GPTConfig(**{**CFG.__dict__, "bias": False})).named_parameters()}
    assert not any(n.endswith(".bias") for n in names)
    assert any(n.endswith(".bias") for n, _ in GPT(CFG).named_parameters())


def test_causality() -> None:
    """Changing a later token never changes the logits of earlier positions."""
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    idx = torch.randint(0, 65, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 65
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_crop_block_size_keeps_the_first_positions() -> None:
    model = GPT(CFG)
    before = model.transformer.wpe.weight[:8].detach().clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert torch.equal(model.transformer.wpe.weight, before)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot grow"):
        model.crop_block_size(9)


def test_weight_decay_only_on_matrices() -> None:
    model = GPT(CFG)
    optim = build_optimizer(
        model,
        OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, fused=None),
        torch.device("cpu"),
    )
    decay, no_decay = optim.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    total = sum(p.numel() for g in optim.param_groups for p in g["params"])
    assert total == model.num_params(non_embedding=False)  # the tied matrix counted once


def test_learning_rate_schedule() -> None:
    cosine = LRConfig(name="cosine", warmup_iters=10, decay_iters=110, min_lr=1e-4)
    lr = [1e-3 * lr_factor(step, cosine, 1e-3) for step in range(130)]
    assert lr[0] == pytest.approx(1e-3 / 11) and lr[9] == pytest.approx(1e-3 * 10 / 11)  # linear warmup
    assert lr[10] == pytest.approx(1e-3)  # the peak right after warmup
    assert lr[60] == pytest.approx((1e-3 + 1e-4) / 2)  # half way down the cosine
    assert lr[110] == lr[129] == pytest.approx(1e-4)  # min_lr from decay_iters on
    assert all(a >= b for a, b in itertools.pairwise(lr[10:]))
    constant = LRConfig(name="constant", warmup_iters=0, decay_iters=110, min_lr=0.0)
    assert lr_factor(0, constant, 1e-3) == lr_factor(500, constant, 1e-3) == 1.0


def test_flops_and_mfu() -> None:
    # GPT-2 124M at block 1024: ~0.85 GFLOP per token trained (6N with N ~ 124M, plus attention)
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig(vocab_size=50257))
    assert 0.84e9 < gpt2.flops_per_token() < 0.86e9
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert peak is not None and peak > 0
    assert mfu(1e6, 1e3, 1e10) == pytest.approx(0.1)
    assert peak_flops(torch.device("cpu"), torch.float32, override=5e9) == 5e9
