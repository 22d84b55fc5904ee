"""The GPT model: shapes, initial loss, weight tying, init scale, cropping, parameter roles, imports, MFU."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hydragpt.model
from hydragpt.engine.metrics import mfu, peak_flops
from hydragpt.model import GPT, GPTConfig

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


def test_parameter_groups_cover_every_parameter_once_by_role() -> None:
    model = GPT(CFG)
    groups = model.parameter_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["embeddings"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert groups["head"] == []  # tied: the head is the token table
    assert all(p.dim() == 2 and names[id(p)].startswith("transformer.h.") for p in groups["matrices"])
    assert len(groups["matrices"]) == 4 * CFG.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert all(p.dim() == 1 for p in groups["vectors"])
    total = sum(p.numel() for group in groups.values() for p in group)
    assert total == model.num_params(non_embedding=False)  # the tied head counted once


def test_a_bad_shape_is_refused_with_its_fix() -> None:
    with pytest.raises(ValueError) as caught:
        GPTConfig(n_embd=30, n_head=4)
    what, fix = caught.value.args
    assert what == "model.n_embd=30 is not divisible by model.n_head=4" and "multiple of n_head" in fix


def test_the_model_imports_only_torch() -> None:
    source = ast.parse((Path(hydragpt.model.__file__)).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(source) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(source) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported - sys.stdlib_module_names == {"torch"}
    script = "import sys, hydragpt.model; print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(result.stdout))
    assert not loaded & {"hydra", "omegaconf", "tiktoken", "yaml", "hydragpt.config", "hydragpt.data"}


def test_flops_and_mfu() -> None:
    # GPT-2 124M at block 1024: ~0.85 GFLOP per token trained (6N with N ~ 124M, plus attention)
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig(vocab_size=50257))
    assert 0.84e9 < gpt2.flops_per_token() < 0.86e9
    peak = peak_flops(torch.device("cpu"), torch.float32)
    assert peak is not None and peak > 0
    assert mfu(1e6, 1e3, 1e10) == pytest.approx(0.1)
    assert peak_flops(torch.device("cpu"), torch.float32, override=5e9) == 5e9
