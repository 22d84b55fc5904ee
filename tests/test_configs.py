"""Every config group option composes, converts to the typed schema and builds what it describes."""

from __future__ import annotations

import re

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from hydragpt.config import prepare_config, sample_config
from hydragpt.engine.optim import Muon
from hydragpt.engine.schedule import Cosine, WarmupStableDecay
from hydragpt.errors import UserError
from hydragpt.loggers.csv_logger import Csv
from hydragpt.model import GPT
from hydragpt.train_config import grad_accum_steps, train_config
from tests.helpers import CONF_DIR, compose_config

GROUPS = ["model", "data", "optim", "lr", "system", "ddp", "logger", "experiment", "paths", "hparams_search"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(group, option) for group in GROUPS for option in options(group)])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = train_config(compose_config("train", [f"{group}={option}"]))
    if group == "model":
        assert cfg.model.name == option
    if group == "system":
        assert cfg.system.device in ("auto", "cpu", "cuda")


def test_required_options_exist() -> None:
    assert {"debug", "tiny_cpu", "baby_char", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl"} <= set(
        options("model")
    )
    assert {"cosine", "constant"} <= set(options("lr"))
    assert {"auto", "cpu", "cuda"} <= set(options("system"))
    assert {"shakespeare_char", "tiny_cpu"} <= set(options("experiment"))


# Hugging Face's parameter counts for OpenAI's GPT-2 checkpoints (vocab 50257, tied head, biases).
GPT2_PARAMS = {
    "gpt2_small": 124_439_808,
    "gpt2_medium": 354_823_168,
    "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200,
}


@pytest.mark.parametrize("option", options("model"))
def test_every_model_builds(option: str) -> None:
    cfg = train_config(compose_config("train", [f"model={option}", "model.vocab_size=50257"]))
    with torch.device("meta"):  # shapes only: the 1.5B model costs no memory
        model = GPT(cfg.model)
    if option in GPT2_PARAMS:
        assert model.num_params(non_embedding=False) == GPT2_PARAMS[option]


def test_tiny_cpu_is_nanogpts_cpu_recipe() -> None:
    cfg = train_config(compose_config("train", ["experiment=tiny_cpu"]))
    m, t, o, lr = cfg.model, cfg.train, cfg.optim, cfg.lr
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias, m.dropout) == (4, 4, 128, 64, False, 0.0)
    assert (t.batch_size, t.grad_accum_steps, t.max_iters, t.grad_clip) == (12, 1, 2000, 1.0)
    assert (o.lr, o.beta1, o.beta2, o.weight_decay) == (1e-3, 0.9, 0.99, 0.1)
    assert isinstance(lr, Cosine) and (lr.warmup_iters, lr.decay_iters, lr.min_lr_ratio) == (100, 2000, 0.1)
    assert (t.eval_interval, t.eval_iters) == (250, 20)
    assert (cfg.system.device, cfg.system.dtype) == ("cpu", "float32")


def test_shakespeare_char_is_nanogpts_gpu_recipe() -> None:
    cfg = train_config(compose_config("train", ["experiment=shakespeare_char"]))
    m, t, o, lr = cfg.model, cfg.train, cfg.optim, cfg.lr
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 6, 384, 256, 0.2)
    assert (t.batch_size, t.max_iters, o.lr, o.beta2, lr.warmup_iters) == (64, 5000, 1e-3, 0.99, 100)


def test_decay_iters_defaults_to_the_runs_length() -> None:
    cfg = train_config(compose_config("train", ["train.max_iters=123"]))
    assert cfg.lr.decay_iters is None  # the Trainer decays until its last step, however the length was given
    with pytest.raises(UserError, match=r"train.epochs needs data.sampling=sequential"):
        train_config(compose_config("train", ["train.epochs=1", "data.sampling=random"]))
    with pytest.raises(UserError, match=r"train.max_tokens and train.epochs are both set"):
        train_config(compose_config("train", ["train.epochs=1", "train.max_tokens=100"]))


def test_sample_and_prepare_configs_compose() -> None:
    s = sample_config(compose_config("sample", ["ckpt=x.pt", "temperature=0"]))
    assert (s.ckpt, s.temperature, s.top_k) == ("x.pt", 0.0, 200)
    p = prepare_config(compose_config("prepare", ["overwrite=true"]))
    assert p.overwrite and p.data.name == "shakespeare_char"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_head=5", "not divisible by model.n_head=5"),
        ("system.device=tpu", "unknown system.device 'tpu'"),
        ("system.dtype=int8", "unknown system.dtype 'int8'"),
        ("model.dropout=1.5", "model.dropout must be in [0, 1)"),
        ("train.batch_size=0", "train.batch_size must be a count >= 1 or auto, got 0"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.beta2=1.5", "optim.beta2 must be in [0, 1)"),
        ("lr.min_lr_ratio=1.5", "lr.min_lr_ratio must be in [0, 1], got 1.5"),
        ("lr.warmup_iters=-3", "lr.warmup_iters must be >= 0"),
        ("ddp.timeout=0", "ddp.timeout must be >= 1 second"),
        ("checkpoint.keep_every=7", "checkpoint.keep_every=7 is not a multiple of train.eval_interval=250"),
        ("train.sample_interval=100", "train.sample_interval=100 is not a multiple of train.eval_interval=250"),
        ("train.sample_tokens=0", "train.sample_tokens must be in [1, 1,000,000], got 0"),
    ],
)
def test_invalid_values_fail_early(override: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        train_config(compose_config("train", [override]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_layer=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("optim.momentum=0.9", "Key 'momentum' not in 'AdamW'"),
        ("train.max_iter=10", "Key 'max_iter' not in 'TrainLoopConfig'"),
        ("lr.decay_ratio=0.1", "Key 'decay_ratio' not in 'Cosine'"),
    ],
)
def test_wrong_types_and_unknown_keys_are_refused_when_composing(override: str, message: str) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        compose_config("train", [override])
    assert message in str(caught.value.__cause__ or caught.value)


def test_a_saved_config_is_typed_again_by_its_targets() -> None:
    """A checkpoint holds its config as plain data: each option comes back as its class."""
    plain = OmegaConf.to_container(compose_config("train", ["optim=muon", "lr=wsd", "logger=csv"]), resolve=True)
    cfg = train_config(plain)
    assert isinstance(cfg.optim, Muon) and isinstance(cfg.lr, WarmupStableDecay) and isinstance(cfg.logger["csv"], Csv)
    plain["optim"]["_target_"] = "hydragpt.engine.optim.NoSuchOptimizer"
    with pytest.raises(UserError, match=r"optim is not an option of a config group"):
        train_config(plain)


def test_total_batch_size_derives_accumulation() -> None:
    cfg = train_config(
        compose_config("train", ["train.grad_accum_steps=null", "train.total_batch_size=3072", "train.batch_size=12"])
    )
    assert grad_accum_steps(cfg.train, block_size=64) == 4
    assert grad_accum_steps(cfg.train, block_size=64, world_size=2) == 2
    with pytest.raises(UserError, match=r"not divisible by batch_size x block_size x world_size = 12 x 64 x 3"):
        grad_accum_steps(cfg.train, block_size=64, world_size=3)
