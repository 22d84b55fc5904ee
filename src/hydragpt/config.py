"""Typed run configuration: the schema of conf/, converted and validated once, before any work.

conf/*.yaml holds every knob with its default and a comment; these dataclasses hold their types. Scripts
hand Hydra's composed `DictConfig` to `train_config` / `sample_config` / `prepare_config` and get back
plain dataclasses, or a `UserError` that names the bad value and how to fix it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydragpt.data.dataset import SPLITS
from hydragpt.data.tokenizer import tiktoken_encodings
from hydragpt.errors import UserError

# Optional[...] rather than `X | None` below: OmegaConf's structured configs read these annotations.
# ruff: noqa: UP045

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("highest", "high", "medium")
OPTIMIZERS = ("adamw",)
LR_SCHEDULES = ("cosine", "constant")
VAL_SPLITS = ("tail", "docs", "head")
DDP_MODES = ("none", "ddp", "fsdp")
DDP_BACKENDS = ("auto", "gloo", "nccl")
SAMPLING = ("random", "sequential")
WANDB_MODES = ("online", "offline", "disabled")
SAMPLE_FORMATS = ("text", "jsonl")
ACTIVATIONS = ("gelu", "gelu_tanh")
# Signals that may stop training with a checkpoint (SIGKILL and SIGSTOP cannot be caught); those a
# platform lacks (SIGUSR1 on Windows) are ignored there.
STOPPABLE_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


@dataclass
class GPTConfig:
    """The model's shape. `vocab_size=None` means "take it from the dataset's tokenizer"."""

    name: str = "custom"
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # older checkpoints have no such key: they used exact GELU


@dataclass
class DataConfig:
    name: str
    source: Optional[str]
    hf_name: Optional[str]
    hf_split: str
    streaming: bool
    text_field: str
    tokenizer: str
    val_split: str
    val_fraction: Optional[float]
    val_tokens: Optional[int]
    split_seed: int
    shard_tokens: int
    sampling: str


@dataclass
class OptimConfig:
    name: str
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    fused: Optional[bool]


@dataclass
class LRConfig:
    name: str
    warmup_iters: int
    decay_iters: Optional[int]
    min_lr: float


@dataclass
class SystemConfig:
    device: str
    dtype: str
    compile: bool
    matmul_precision: str
    seed: int
    peak_flops: Optional[float]


@dataclass
class DDPConfig:
    name: str
    backend: str
    timeout: int
    reshard_after_forward: bool = True  # ddp=fsdp only (conf/ddp/fsdp.yaml)


@dataclass
class WandbConfig:
    project: str
    entity: Optional[str]
    group: Optional[str]
    name: Optional[str]
    tags: list[str]
    notes: Optional[str]
    mode: Optional[str]
    init_timeout: float


@dataclass
class TensorboardConfig:
    dir: str


@dataclass
class CsvConfig:
    file: str


@dataclass
class LoggerConfig:
    """Console and metrics.jsonl are always on; each tracker runs when its section is present."""

    plot: bool
    wandb: Optional[WandbConfig] = None
    tensorboard: Optional[TensorboardConfig] = None
    csv: Optional[CsvConfig] = None


@dataclass
class PathsConfig:
    data_dir: str
    output_dir: str


@dataclass
class TrainLoopConfig:
    max_iters: int
    max_tokens: Optional[int]
    epochs: Optional[float]
    batch_size: int
    grad_accum_steps: Optional[int]
    total_batch_size: Optional[int]
    grad_clip: float
    eval_interval: int
    eval_iters: int
    log_interval: int
    always_save_checkpoint: bool
    skip_nonfinite: int
    stop_signals: list[str]
    eval_only: bool
    init_from: str
    crop_block_size: Optional[int]
    hellaswag_interval: Optional[int]
    hellaswag_examples: Optional[int]


@dataclass
class CheckpointConfig:
    keep_last: int
    keep_every: Optional[int]


@dataclass
class HellaswagConfig:
    path: str
    url: str


@dataclass
class TrainConfig:
    model: GPTConfig
    data: DataConfig
    optim: OptimConfig
    lr: LRConfig
    system: SystemConfig
    ddp: DDPConfig
    logger: LoggerConfig
    paths: PathsConfig
    train: TrainLoopConfig
    checkpoint: CheckpointConfig
    hellaswag: HellaswagConfig
    resume: Optional[str] = None


@dataclass
class SampleConfig:
    ckpt: str
    init_from: Optional[str]
    start: str
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    seed: int
    device: str
    dtype: str
    use_cache: bool
    stop: list[str]
    out: Optional[str]
    format: str
    chat: bool
    paths: PathsConfig


@dataclass
class PrepareConfig:
    data: DataConfig
    paths: PathsConfig
    overwrite: bool
    workers: Optional[int]
    task_mb: int


@dataclass
class PeekConfig:
    data: DataConfig
    paths: PathsConfig
    split: str
    offset: int
    n_tokens: int
    ids: bool


@dataclass
class BenchPrepareConfig:
    paths: PathsConfig
    size_mb: int
    workers: list[int]
    repeats: int
    tokenizer: str
    task_mb: int
    seed: int
    work_dir: str


@dataclass
class BenchSampleConfig:
    model: GPTConfig
    ckpt: Optional[str]
    vocab_size: int
    prompt_tokens: int
    max_new_tokens: int
    num_samples: int
    repeats: int
    device: str
    dtype: str
    seed: int


@dataclass
class EvalConfig:
    ckpt: str
    init_from: Optional[str]
    task: str
    split: str
    dataset: Optional[str]
    batch_size: int
    device: str
    dtype: str
    limit: Optional[int]
    show_examples: int
    out: Optional[str]
    hellaswag: HellaswagConfig
    paths: PathsConfig


@dataclass
class ExportConfig:
    ckpt: str
    out: str
    paths: PathsConfig


Schema = TypeVar("Schema")


def to_dataclass(cfg: DictConfig | dict[str, Any], schema: type[Schema]) -> Schema:
    """Check `cfg` against `schema` (unknown keys, wrong types, missing values) and convert it."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as ex:
        key = getattr(ex, "full_key", None) or "?"
        reason = str(ex).splitlines()[0]
        raise UserError(
            f"invalid config value at '{key}': {reason}",
            "check the key's spelling and type; `--cfg job` prints the composed config",
        ) from ex


def _require(ok: bool, what: str, fix: str) -> None:
    if not ok:
        raise UserError(what, fix)


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, f"unknown {key} '{value}'", f"use one of: {', '.join(allowed)}")


def validate_model(m: GPTConfig) -> None:
    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        _require(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}", "set a positive size")
    _require(
        m.n_embd % m.n_head == 0,
        f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}",
        "choose n_embd as a multiple of n_head, e.g. n_embd=384 n_head=6",
    )
    _require(m.vocab_size is None or m.vocab_size >= 1, "model.vocab_size must be >= 1", "or null for the data's")
    _require(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}", "e.g. 0.0 or 0.2")
    _choice(m.activation, ACTIVATIONS, "model.activation")


def validate_seed(seed: int, key: str) -> None:
    _require(0 <= seed < 2**32, f"{key} must be in [0, 2^32), got {seed}", "use a non-negative 32-bit seed, e.g. 1337")


def validate_device(device: str, key: str) -> None:
    kind, colon, index = device.partition(":")
    _choice(kind, DEVICES, key)
    _require(
        not colon or (kind == "cuda" and index.isdigit() and len(index) <= 4),
        f"bad {key} '{device}'",
        "use auto, cpu, mps, cuda or cuda:<index>",
    )


def validate_train(cfg: TrainConfig) -> None:
    """All the cross-field checks that need no data or hardware; run once, before any work."""
    validate_model(cfg.model)
    t = cfg.train
    _require(t.max_iters >= 0, "train.max_iters must be >= 0", "set a non-negative count")
    _require(
        t.max_tokens is None or t.epochs is None,
        "train.max_tokens and train.epochs are both set",
        "give the run's length one way: max_iters, max_tokens or epochs",
    )
    _require(t.max_tokens is None or t.max_tokens >= 1, "train.max_tokens must be >= 1", "or null")
    _require(t.epochs is None or t.epochs > 0, "train.epochs must be > 0", "e.g. train.epochs=1, or null")
    _require(
        t.epochs is None or cfg.data.sampling == "sequential",
        "train.epochs needs data.sampling=sequential (random windows have no epochs)",
        "set data.sampling=sequential, or use train.max_iters / train.max_tokens",
    )
    for key in ("batch_size", "eval_interval", "eval_iters", "log_interval"):
        _require(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}", "set a positive count")
    _require(
        t.grad_accum_steps is not None or t.total_batch_size is not None,
        "train.grad_accum_steps and train.total_batch_size are both null",
        "set train.grad_accum_steps=1, or the tokens per step in train.total_batch_size",
    )
    if t.total_batch_size is not None:
        _require(t.total_batch_size >= 1, "train.total_batch_size must be >= 1", "or null to use grad_accum_steps")
    elif t.grad_accum_steps is not None:
        _require(t.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1", "set a positive count")
    if t.crop_block_size is not None:
        _require(t.crop_block_size >= 1, "train.crop_block_size must be >= 1", "or null to keep the block size")
        _require(t.init_from != "scratch", "train.crop_block_size only applies with train.init_from", "or set it null")
    validate_seed(cfg.system.seed, "system.seed")
    if t.hellaswag_interval is not None:
        _require(
            t.hellaswag_interval >= 1 and t.hellaswag_interval % t.eval_interval == 0,
            f"train.hellaswag_interval={t.hellaswag_interval} is not a multiple of train.eval_interval"
            f"={t.eval_interval}",
            "HellaSwag is scored at evaluations: use a multiple of eval_interval, or null",
        )
    examples = t.hellaswag_examples
    _require(examples is None or examples >= 1, "train.hellaswag_examples must be >= 1", "or null for all")
    _require(t.grad_clip >= 0, "train.grad_clip must be >= 0", "use 0 to disable clipping")
    _require(t.skip_nonfinite >= 0, "train.skip_nonfinite must be >= 0", "use 0 to stop at the first nan/inf step")
    validate_stop_signals(t.stop_signals)
    validate_checkpoint(cfg.checkpoint, t.eval_interval)
    _choice(cfg.optim.name, OPTIMIZERS, "optim")
    _require(cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}", "e.g. optim.lr=6e-4")
    _require(
        0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1,
        "optim betas must be in [0, 1)",
        "e.g. 0.9, 0.95",
    )
    _require(cfg.optim.eps > 0, f"optim.eps must be > 0, got {cfg.optim.eps}", "e.g. 1e-8")
    _require(cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0", "e.g. 0.1, or 0 to disable")
    _choice(cfg.lr.name, LR_SCHEDULES, "lr schedule")
    _require(cfg.lr.warmup_iters >= 0, "lr.warmup_iters must be >= 0", "use 0 for no warmup")
    _require(
        0 <= cfg.lr.min_lr <= cfg.optim.lr,
        f"lr.min_lr={cfg.lr.min_lr} must be between 0 and optim.lr={cfg.optim.lr}",
        "usually optim.lr / 10",
    )
    _require(
        cfg.lr.decay_iters is None or cfg.lr.decay_iters >= 0,
        "lr.decay_iters must be >= 0",
        "or null to decay until the run's last step",
    )
    validate_device(cfg.system.device, "system.device")
    _choice(cfg.system.dtype, DTYPES, "system.dtype")
    _choice(cfg.system.matmul_precision, MATMUL_PRECISIONS, "system.matmul_precision")
    validate_data(cfg.data)
    _choice(cfg.ddp.name, DDP_MODES, "ddp")
    _choice(cfg.ddp.backend, DDP_BACKENDS, "ddp.backend")
    _require(cfg.ddp.timeout >= 1, "ddp.timeout must be >= 1 second", "e.g. ddp.timeout=600")
    if cfg.logger.wandb is not None and cfg.logger.wandb.mode is not None:
        _choice(cfg.logger.wandb.mode, WANDB_MODES, "logger.wandb.mode")


def validate_output_file(out: str | None, key: str) -> None:
    """Before any work: a file `out` names could be created (missing directories are made on writing)."""
    if not out:
        return
    path = Path(out).expanduser()
    _require(not path.is_dir(), f"{key}={out} is a directory", f"give a file name, e.g. {key}={path / 'result.txt'}")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    _require(
        existing.is_dir() and os.access(existing, os.W_OK),
        f"cannot write {key}={out}: {existing} is not a writable directory",
        f"choose another {key}",
    )


def validate_stop_signals(names: list[str]) -> None:
    for name in names:
        _require(
            name in STOPPABLE_SIGNALS,
            f"train.stop_signals: '{name}' is not a signal training can catch here",
            f"use names from: {', '.join(STOPPABLE_SIGNALS)}",
        )


def validate_checkpoint(c: CheckpointConfig, eval_interval: int) -> None:
    _require(c.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {c.keep_last}", "use 0 to keep none")
    if c.keep_every is not None:
        _require(
            c.keep_every >= 1 and c.keep_every % eval_interval == 0,
            f"checkpoint.keep_every={c.keep_every} is not a multiple of train.eval_interval={eval_interval}",
            "checkpoints are written at evaluations: use a multiple of eval_interval, or null",
        )


def grad_accum_steps(t: TrainLoopConfig, block_size: int, world_size: int = 1) -> int:
    """Micro-steps per optimizer step: derived from the total tokens per step when that is set, else given."""
    if t.total_batch_size is None:
        assert t.grad_accum_steps is not None
        return t.grad_accum_steps
    per_micro_step = t.batch_size * block_size * world_size
    if t.total_batch_size % per_micro_step != 0:
        nearest = per_micro_step * math.ceil(t.total_batch_size / per_micro_step)
        raise UserError(
            f"train.total_batch_size={t.total_batch_size} is not divisible by batch_size x block_size x "
            f"world_size = {t.batch_size} x {block_size} x {world_size} = {per_micro_step}",
            f"use a multiple of {per_micro_step}, e.g. {nearest}",
        )
    return t.total_batch_size // per_micro_step


def validate_tokenizer(name: str, key: str) -> None:
    if name != "char":  # tiktoken's list of encodings is only looked up when needed
        _choice(name, ("char", *tiktoken_encodings()), key)


def validate_data(d: DataConfig) -> None:
    _require(
        bool(d.name) and "/" not in d.name and "\\" not in d.name and d.name not in (".", ".."),
        f"data.name '{d.name}' is not a plain directory name",
        "datasets live directly under paths.data_dir: use a name such as shakespeare_char",
    )
    validate_tokenizer(d.tokenizer, "data.tokenizer")
    _choice(d.val_split, VAL_SPLITS, "data.val_split")
    _choice(d.sampling, SAMPLING, "data.sampling")
    if d.val_split == "head":
        _require(
            d.val_tokens is not None and d.val_tokens >= 1,
            f"data.val_split=head needs data.val_tokens >= 1, got {d.val_tokens}",
            "e.g. data.val_tokens=100000000, the first shard",
        )
    else:
        _require(
            d.val_fraction is not None and 0 < d.val_fraction < 1,
            f"data.val_split={d.val_split} needs data.val_fraction in (0, 1), got {d.val_fraction}",
            "e.g. data.val_fraction=0.1",
        )
    _require(d.shard_tokens >= 1, "data.shard_tokens must be >= 1", "e.g. 100000000 (200 MB of uint16)")
    validate_seed(d.split_seed, "data.split_seed")


def train_config(cfg: DictConfig | dict[str, Any], world_size: int = 1) -> TrainConfig:
    typed = to_dataclass(cfg, TrainConfig)
    validate_train(typed)
    if typed.train.init_from == "scratch":  # from a checkpoint, the block size is only known once loaded
        grad_accum_steps(typed.train, typed.model.block_size, world_size)
    return typed


def sample_config(cfg: DictConfig) -> SampleConfig:
    typed = to_dataclass(cfg, SampleConfig)
    _require(typed.num_samples >= 1, f"num_samples must be >= 1, got {typed.num_samples}", "e.g. num_samples=3")
    _require(typed.max_new_tokens >= 0, "max_new_tokens must be >= 0", "e.g. max_new_tokens=500")
    _require(
        typed.temperature >= 0,
        f"temperature must be >= 0, got {typed.temperature}",
        "use temperature=0 for greedy decoding or a positive value such as 0.8",
    )
    _require(typed.top_k is None or typed.top_k >= 1, f"top_k must be >= 1, got {typed.top_k}", "or top_k=null")
    _require(
        typed.top_p is None or 0 < typed.top_p <= 1,
        f"top_p must be in (0, 1], got {typed.top_p}",
        "or top_p=null",
    )
    validate_device(typed.device, "device")
    _choice(typed.dtype, DTYPES, "dtype")
    validate_seed(typed.seed, "seed")
    _choice(typed.format, SAMPLE_FORMATS, "format")
    _require(all(typed.stop), "stop strings must not be empty", "e.g. stop=['\\n\\n']")
    validate_output_file(typed.out, "out")
    return typed


def prepare_config(cfg: DictConfig) -> PrepareConfig:
    typed = to_dataclass(cfg, PrepareConfig)
    validate_data(typed.data)
    _require(typed.workers is None or typed.workers >= 1, "workers must be >= 1", "or null for every core")
    _require(typed.task_mb >= 1, "task_mb must be >= 1", "e.g. 4")
    return typed


def peek_config(cfg: DictConfig) -> PeekConfig:
    typed = to_dataclass(cfg, PeekConfig)
    validate_data(typed.data)
    _choice(typed.split, ("train", "val"), "split")
    _require(typed.offset >= 0, "offset must be >= 0", "e.g. offset=0")
    _require(typed.n_tokens >= 1, "n_tokens must be >= 1", "e.g. n_tokens=200")
    return typed


def bench_prepare_config(cfg: DictConfig) -> BenchPrepareConfig:
    typed = to_dataclass(cfg, BenchPrepareConfig)
    _require(typed.size_mb >= 1, "size_mb must be >= 1", "e.g. size_mb=200")
    _require(bool(typed.workers) and min(typed.workers) >= 1, "workers must list counts >= 1", "e.g. workers=[1,2]")
    _require(typed.repeats >= 1, "repeats must be >= 1", "e.g. repeats=2")
    _require(typed.task_mb >= 1, "task_mb must be >= 1", "e.g. 4")
    validate_seed(typed.seed, "seed")
    validate_tokenizer(typed.tokenizer, "tokenizer")
    return typed


def bench_sample_config(cfg: DictConfig) -> BenchSampleConfig:
    typed = to_dataclass(cfg, BenchSampleConfig)
    validate_model(typed.model)
    for key in ("vocab_size", "prompt_tokens", "max_new_tokens", "num_samples", "repeats"):
        _require(getattr(typed, key) >= 1, f"{key} must be >= 1, got {getattr(typed, key)}", "set a positive count")
    validate_device(typed.device, "device")
    _choice(typed.dtype, DTYPES, "dtype")
    validate_seed(typed.seed, "seed")
    return typed


EVAL_TASKS = ("val_loss", "hellaswag")


def eval_config(cfg: DictConfig) -> EvalConfig:
    typed = to_dataclass(cfg, EvalConfig)
    _choice(typed.task, EVAL_TASKS, "task")
    _choice(typed.split, SPLITS, "split")
    _require(typed.batch_size >= 1, f"batch_size must be >= 1, got {typed.batch_size}", "e.g. batch_size=8")
    _require(typed.limit is None or typed.limit >= 1, "limit must be >= 1", "or null for everything")
    _require(typed.show_examples >= 0, "show_examples must be >= 0", "e.g. show_examples=3")
    validate_device(typed.device, "device")
    _choice(typed.dtype, DTYPES, "dtype")
    validate_output_file(typed.out, "out")
    return typed


def export_config(cfg: DictConfig) -> ExportConfig:
    typed = to_dataclass(cfg, ExportConfig)
    _require(bool(typed.out.strip()), "out= is empty", "name the directory to export to, e.g. out=exported/")
    return typed
