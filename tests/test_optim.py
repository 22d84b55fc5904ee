"""Optimizers and lr schedules, built from their config options: groups, learning rates, skipping, shapes."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from hydragpt.engine.optim import AdamW, Muon, step_if_finite, undo_step_if
from hydragpt.engine.schedule import Constant, Cosine, WarmupStableDecay, set_lr
from hydragpt.errors import UserError
from hydragpt.model import GPT, GPTConfig
from hydragpt.train_config import train_config
from tests.helpers import compose_config

CFG = GPTConfig(name="t", n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=True)
CPU = torch.device("cpu")


def test_adamw_decays_matrices_and_embeddings_only() -> None:
    model = GPT(CFG)
    (optimizer,) = AdamW(lr=1e-3, weight_decay=0.1).build(model, CPU)
    decay, no_decay = optimizer.param_groups
    assert isinstance(optimizer, torch.optim.AdamW)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert decay["initial_lr"] == no_decay["initial_lr"] == 1e-3
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert total == model.num_params(non_embedding=False)  # the tied matrix counted once


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest_each_with_its_lr() -> None:
    model = GPT(CFG)
    muon, adamw = Muon(lr=0.02, embedding_lr=0.005, vector_lr=0.001).build(model, CPU)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    groups = model.parameter_groups()
    assert [p for g in muon.param_groups for p in g["params"]] == groups["matrices"]
    embeddings, vectors = adamw.param_groups
    assert embeddings["params"] == groups["embeddings"] and vectors["params"] == groups["vectors"]
    assert (muon.param_groups[0]["initial_lr"], embeddings["initial_lr"], vectors["initial_lr"]) == (0.02, 0.005, 0.001)
    assert adamw.defaults["betas"] == (0.8, 0.95)


def test_an_untied_head_has_its_own_lr_under_muon_and_is_decayed_under_adamw() -> None:
    model = GPT(replace(CFG, tie_embeddings=False))
    _, adamw = Muon(embedding_lr=0.3, head_lr=0.002).build(model, CPU)
    embeddings, head, _ = adamw.param_groups
    assert head["params"] == [model.lm_head.weight] and (embeddings["lr"], head["lr"]) == (0.3, 0.002)
    (_, follows, _) = Muon(embedding_lr=0.3).build(model, CPU)[1].param_groups
    assert follows["lr"] == 0.3  # head_lr null: embedding_lr
    (only,) = [g for g in AdamW(weight_decay=0.1).build(model, CPU)[0].param_groups if g["weight_decay"]]
    assert any(p is model.lm_head.weight for p in only["params"])
    with pytest.raises(UserError, match=r"optim\.head_lr=0\.002 has no effect without model\.tie_embeddings=false"):
        train_config(compose_config("train", ["optim=muon", "optim.head_lr=0.002"]))


def test_muon_orthogonalises_the_update_of_a_matrix() -> None:
    """One Muon step without momentum history moves a square matrix by ~lr times an orthogonal-like matrix:
    its singular values all come out near 1 (Newton-Schulz's quintic lands them in about [0.7, 1.2])."""
    torch.manual_seed(0)
    model = GPT(CFG)
    muon, _ = Muon(lr=0.1, momentum=0.0, nesterov=False).build(model, CPU)
    weight = model.transformer.h[0].attn.c_proj.weight  # 32 x 32
    before = weight.detach().clone()
    weight.grad = torch.randn_like(weight) * torch.logspace(-1, 0, 32)  # singular values 10x apart
    muon.step()
    singular = torch.linalg.svdvals((before - weight.detach()) / 0.1)
    assert singular.min() > 0.5 and singular.max() < 1.3


def test_a_nonfinite_step_is_skipped_on_the_device_by_fused_adamw() -> None:
    model = GPT(CFG)
    (optimizer,) = AdamW(fused=True).build(model, CPU)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    step_if_finite(optimizer, torch.ones(()))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step_if_finite(optimizer, torch.zeros(()))
    assert not all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fused", [True, False])
def test_step_if_finite_applies_finite_steps_only(fused: bool) -> None:
    model = GPT(CFG)
    optimizers = Muon(fused=fused).build(model, CPU)
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    for optimizer in optimizers:
        step_if_finite(optimizer, torch.ones(()))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def test_a_step_undone_on_the_device_leaves_no_trace() -> None:
    """What the GPU does for Muon and non-fused AdamW: a poisoned step (the first, which creates the state, and
    a later one) is undone, and the finite steps around it match an optimizer that never saw it."""
    model, reference = GPT(CFG), GPT(CFG)
    reference.load_state_dict(model.state_dict())
    optimizers, expected = Muon(fused=False).build(model, CPU), Muon(fused=False).build(reference, CPU)
    for step, poisoned in enumerate((True, False, True, False)):
        torch.manual_seed(step)
        for p, r in zip(model.parameters(), reference.parameters(), strict=True):
            r.grad = torch.randn_like(r)
            p.grad = r.grad.clone()
            if poisoned:
                p.grad[0] = float("nan")
        for optimizer in optimizers:
            undo_step_if(optimizer, torch.tensor(float(poisoned)))
        if not poisoned:
            for optimizer in expected:
                optimizer.step()
    assert all(torch.equal(p, r) for p, r in zip(model.parameters(), reference.parameters(), strict=True))
    for optimizer, other in zip(optimizers, expected, strict=True):
        states = zip(optimizer.state.values(), other.state.values(), strict=True)
        assert all(torch.equal(state[key], value) for state, theirs in states for key, value in theirs.items())


def test_cosine_warms_up_then_decays_to_its_floor() -> None:
    cosine = Cosine(warmup_iters=10, decay_iters=110, min_lr_ratio=0.1)
    factors = [cosine.factor(step, 130) for step in range(130)]
    assert factors[0] == pytest.approx(1 / 11) and factors[9] == pytest.approx(10 / 11)  # linear warmup
    assert factors[10] == pytest.approx(1.0)  # the peak right after warmup
    assert factors[60] == pytest.approx(0.55)  # half way down the cosine
    assert factors[110] == factors[129] == pytest.approx(0.1)  # the floor from decay_iters on
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert Cosine(warmup_iters=0, min_lr_ratio=0.0).factor(99, 100) == pytest.approx(0.0, abs=1e-3)  # null: run's end


def test_constant_is_the_peak_after_warmup() -> None:
    assert Constant(warmup_iters=0).factor(0, 10) == Constant().factor(500, 10) == 1.0
    assert Constant(warmup_iters=4).factor(1, 10) == pytest.approx(2 / 5)


def test_wsd_is_stable_then_decays_linearly_over_the_last_fraction() -> None:
    wsd = WarmupStableDecay(warmup_iters=10, decay_ratio=0.2, min_lr_ratio=0.1)
    factors = [wsd.factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(1 / 11) and factors[10] == 1.0
    assert factors[10:80] == [1.0] * 70  # stable until the last 20% of the run
    assert factors[90] == pytest.approx(1 - 0.5 * 0.9)  # half way down the decay
    assert factors[99] == pytest.approx(1 - 19 / 20 * 0.9)
    assert all(a > b for a, b in itertools.pairwise(factors[80:]))
    assert wsd.factor(100, 100) == pytest.approx(0.1)  # the floor at the run's end


def test_a_schedule_multiplies_each_groups_initial_lr() -> None:
    optimizers = Muon(lr=0.02, embedding_lr=0.004, vector_lr=0.002).build(GPT(CFG), CPU)
    set_lr(optimizers, 0.5)
    assert [g["lr"] for o in optimizers for g in o.param_groups] == [0.01, 0.002, 0.001]


def test_muon_and_wsd_compose_from_their_options() -> None:
    cfg = train_config(compose_config("train", ["optim=muon", "lr=wsd", "optim.ns_steps=3", "lr.decay_ratio=0.5"]))
    assert isinstance(cfg.optim, Muon) and cfg.optim.ns_steps == 3
    assert isinstance(cfg.lr, WarmupStableDecay) and cfg.lr.decay_ratio == 0.5
    with pytest.raises(UserError, match=r"unknown optim\.adjust_lr_fn .fast."):
        train_config(compose_config("train", ["optim=muon", "optim.adjust_lr_fn=fast"]))


def test_muon_on_a_torch_without_it_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"optim=muon needs torch.optim.Muon, which torch .* lacks"):
        train_config(compose_config("train", ["optim=muon"]))
