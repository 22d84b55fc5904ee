"""Typed configuration: every knob's type, default and one-line doc, in one place, checked when composed.

The schemas here and the component options (`@option` classes in engine/optim.py, engine/schedule.py,
engine/parallel.py and the loggers) are registered in Hydra's ConfigStore; conf/*.yaml extend them and set
only the values they change. Composition itself refuses unknown keys and values of the wrong type; the
conversion to dataclasses (`train_config`, ...) runs each class's own checks (`__post_init__`) and the
cross-field ones below, and gives back plain objects, or a `UserError` that names the bad value and how
to fix it. All of this happens before any run directory exists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The component options register their schemas when their modules are imported.
from hydragpt.data.dataset import SPLITS
from hydragpt.data.tokenizer import tiktoken_encodings
from hydragpt.engine import optim, parallel, schedule  # noqa: F401
from hydragpt.errors import UserError
from hydragpt.loggers import csv_logger, tensorboard_logger, wandb_logger  # noqa: F401
from hydragpt.model import GPTConfig

# Optional[...] rather than `X | None` below: OmegaConf's structured configs read these annotations.
# ruff: noqa: UP045

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("highest", "high", "medium")
VAL_SPLITS = ("tail", "docs", "head")
SAMPLING = ("random", "sequential")
SAMPLE_FORMATS = ("text", "jsonl")
OPTION_GROUPS = ("optim", "lr", "ddp")  # groups whose options are classes (`_target_`), besides the logger's trackers
# Signals that may stop training with a checkpoint (SIGKILL and SIGSTOP cannot be caught); those a
# platform lacks (SIGUSR1 on Windows) are ignored there.
STOPPABLE_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


def _require(ok: bool, what: str, fix: str) -> None:
    if not ok:
        raise UserError(what, fix)


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, f"unknown {key} '{value}'", f"use one of: {', '.join(allowed)}")


@dataclass
class DataConfig:
    """A dataset: where its text comes from, how it is tokenized and split, and how batches are drawn."""

    name: str = "text"  # directory under paths.data_dir
    source: Optional[str] = None  # .txt, .jsonl, .parquet; a directory or glob of them; a URL; hf:<dataset>
    hf_name: Optional[str] = None  # Hugging Face config name (hf: sources only)
    hf_split: str = "train"  # Hugging Face split to read (hf: sources only)
    streaming: bool = False  # stream a Hugging Face dataset instead of downloading it first
    text_field: str = "text"  # field holding the text in .jsonl/.parquet/Hugging Face rows
    tokenizer: str = "gpt2"  # char, or a tiktoken encoding: gpt2, r50k_base, p50k_base, cl100k_base, o200k_base
    val_split: str = "tail"  # tail: last val_fraction of the characters; docs: random documents; head: first val_tokens
    val_fraction: Optional[float] = 0.1  # share held out for val (tail, docs)
    val_tokens: Optional[int] = None  # tokens held out for val (head)
    split_seed: int = 2357  # which documents go to val (docs)
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB of uint16)
    sampling: str = "sequential"  # sequential: every window once per epoch; random: nanoGPT's random windows

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and "/" not in self.name and "\\" not in self.name and self.name not in (".", ".."),
            f"data.name '{self.name}' is not a plain directory name",
            "datasets live directly under paths.data_dir: use a name such as shakespeare_char",
        )
        validate_tokenizer(self.tokenizer, "data.tokenizer")
        _choice(self.val_split, VAL_SPLITS, "data.val_split")
        _choice(self.sampling, SAMPLING, "data.sampling")
        if self.val_split == "head":
            _require(
                self.val_tokens is not None and self.val_tokens >= 1,
                f"data.val_split=head needs data.val_tokens >= 1, got {self.val_tokens}",
                "e.g. data.val_tokens=100000000, the first shard",
            )
        else:
            _require(
                self.val_fraction is not None and 0 < self.val_fraction < 1,
                f"data.val_split={self.val_split} needs data.val_fraction in (0, 1), got {self.val_fraction}",
                "e.g. data.val_fraction=0.1",
            )
        _require(self.shard_tokens >= 1, "data.shard_tokens must be >= 1", "e.g. 100000000 (200 MB of uint16)")
        validate_seed(self.split_seed, "data.split_seed")


@dataclass
class SystemConfig:
    """The device and numerics a run uses."""

    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bfloat16 on GPUs that have it, float32 elsewhere), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model: faster steps on GPUs after a one-off compile
    matmul_precision: str = "high"  # float32 matmuls: highest (exact fp32), high (TF32 on GPUs), medium (bf16)
    seed: int = 1337  # seeds init, data order and dropout: same seed, same run
    peak_flops: Optional[float] = None  # the device's peak FLOP/s for MFU; null looks it up in a table

    def __post_init__(self) -> None:
        validate_device(self.device, "system.device")
        _choice(self.dtype, DTYPES, "system.dtype")
        _choice(self.matmul_precision, MATMUL_PRECISIONS, "system.matmul_precision")
        validate_seed(self.seed, "system.seed")


@dataclass
class PathsConfig:
    """Where things live; relative paths are relative to the directory you launch from."""

    data_dir: str = "data"  # prepared datasets, one directory each (raw downloads are cached there too)
    output_dir: str = "outputs"  # run directories (and multirun/ for sweeps)


@dataclass
class HellaswagConfig:
    """HellaSwag's validation set (10,042 examples), for eval.py task=hellaswag and train.hellaswag_interval."""

    path: str = "${paths.data_dir}/hellaswag/hellaswag_val.jsonl"  # the official file; downloaded here when absent
    url: str = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"  # where from


@dataclass
class TrainLoopConfig:
    """How long and how a run trains, evaluates and logs."""

    max_iters: int = 2000  # optimizer steps to train for
    max_tokens: Optional[int] = None  # or train for this many tokens: max_iters = ceil(max_tokens / tokens per step)
    epochs: Optional[float] = None  # or for this many passes over the training split (data.sampling=sequential)
    batch_size: int = 12  # sequences per micro-batch (per device); memory grows with it
    grad_accum_steps: Optional[int] = 1  # micro-batches per optimizer step: a larger batch at the same memory
    total_batch_size: Optional[int] = None  # tokens per optimizer step; when set it derives the accumulation
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables clipping)
    eval_interval: int = 250  # evaluate train/val loss (and checkpoint) every this many steps
    eval_iters: int = 20  # batches per split in each evaluation: more is steadier and slower
    log_interval: int = (
        10  # one progress line and metrics record every this many steps (the host reads the device only then)
    )
    always_save_checkpoint: bool = (
        True  # write last.pt at every evaluation (false: only best.pt when val improves, and at the end)
    )
    skip_nonfinite: int = 0  # skip up to this many steps whose loss or gradient norm is nan/inf, then stop
    stop_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"]
    )  # stop within log_interval steps with a checkpoint, exit 75
    eval_only: bool = False  # evaluate once and exit (with init_from to score a saved model)
    init_from: str = "scratch"  # scratch, a checkpoint (or run directory), gpt2[-medium|-large|-xl] or hf:<dir>
    crop_block_size: Optional[int] = None  # with init_from: shorten the checkpoint's context to this many tokens
    hellaswag_interval: Optional[int] = None  # also score HellaSwag at evaluations whose step is a multiple of this
    hellaswag_examples: Optional[int] = None  # score only the first this many HellaSwag examples (null: all 10,042)
    plot: bool = True  # write plots/metrics.png at the end of training

    def __post_init__(self) -> None:
        _require(self.max_iters >= 0, "train.max_iters must be >= 0", "set a non-negative count")
        _require(
            self.max_tokens is None or self.epochs is None,
            "train.max_tokens and train.epochs are both set",
            "give the run's length one way: max_iters, max_tokens or epochs",
        )
        _require(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens must be >= 1", "or null")
        _require(self.epochs is None or self.epochs > 0, "train.epochs must be > 0", "e.g. train.epochs=1, or null")
        for key in ("batch_size", "eval_interval", "eval_iters", "log_interval"):
            value = getattr(self, key)
            _require(value >= 1, f"train.{key} must be >= 1, got {value}", "set a positive count")
        _require(
            self.grad_accum_steps is not None or self.total_batch_size is not None,
            "train.grad_accum_steps and train.total_batch_size are both null",
            "set train.grad_accum_steps=1, or the tokens per step in train.total_batch_size",
        )
        if self.total_batch_size is not None:
            _require(
                self.total_batch_size >= 1, "train.total_batch_size must be >= 1", "or null to use grad_accum_steps"
            )
        elif self.grad_accum_steps is not None:
            _require(self.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1", "set a positive count")
        if self.crop_block_size is not None:
            _require(self.crop_block_size >= 1, "train.crop_block_size must be >= 1", "or null to keep the block size")
            _require(
                self.init_from != "scratch", "train.crop_block_size only applies with train.init_from", "or set it null"
            )
        if self.hellaswag_interval is not None:
            _require(
                self.hellaswag_interval >= 1 and self.hellaswag_interval % self.eval_interval == 0,
                f"train.hellaswag_interval={self.hellaswag_interval} is not a multiple of train.eval_interval"
                f"={self.eval_interval}",
                "HellaSwag is scored at evaluations: use a multiple of eval_interval, or null",
            )
        examples = self.hellaswag_examples
        _require(examples is None or examples >= 1, "train.hellaswag_examples must be >= 1", "or null for all")
        _require(self.grad_clip >= 0, "train.grad_clip must be >= 0", "use 0 to disable clipping")
        _require(self.skip_nonfinite >= 0, "train.skip_nonfinite must be >= 0", "use 0 to stop at the first nan/inf")
        for name in self.stop_signals:
            _require(
                name in STOPPABLE_SIGNALS,
                f"train.stop_signals: '{name}' is not a signal training can catch here",
                f"use names from: {', '.join(STOPPABLE_SIGNALS)}",
            )


@dataclass
class CheckpointConfig:
    """Which checkpoints a run keeps besides last.pt and best.pt."""

    keep_last: int = 0  # also keep the newest this many as checkpoints/step_<N>.pt (0: only last.pt and best.pt)
    keep_every: Optional[int] = None  # and keep step_<N>.pt for good when N is a multiple of this (null: never)

    def __post_init__(self) -> None:
        _require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {self.keep_last}", "use 0 to keep none")


@dataclass
class TrainConfig:
    """scripts/train.py's config: the component groups (each option builds its part) and the loop's knobs."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: Any = MISSING  # an option of conf/optim/: builds the optimizers
    lr: Any = MISSING  # an option of conf/lr/: the schedule's multiplier of each group's lr
    system: SystemConfig = field(default_factory=SystemConfig)
    ddp: Any = MISSING  # an option of conf/ddp/: how the model is spread over the ranks
    logger: dict[str, Any] = field(default_factory=dict)  # trackers by name (conf/logger/), each builds a logger
    paths: PathsConfig = field(default_factory=PathsConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hellaswag: HellaswagConfig = field(default_factory=HellaswagConfig)
    resume: Optional[str] = None  # a run directory to continue exactly where it stopped (its config + these overrides)

    def __post_init__(self) -> None:
        """Checks across groups (each group checked its own knobs already)."""
        _require(
            self.train.epochs is None or self.data.sampling == "sequential",
            "train.epochs needs data.sampling=sequential (random windows have no epochs)",
            "set data.sampling=sequential, or use train.max_iters / train.max_tokens",
        )
        keep_every, eval_interval = self.checkpoint.keep_every, self.train.eval_interval
        if keep_every is not None:
            _require(
                keep_every >= 1 and keep_every % eval_interval == 0,
                f"checkpoint.keep_every={keep_every} is not a multiple of train.eval_interval={eval_interval}",
                "checkpoints are written at evaluations: use a multiple of eval_interval, or null",
            )


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
    """Check `cfg` against `schema` (unknown keys, wrong types, missing values), convert it, and run each
    class's own checks; a check's `ValueError(what, fix)` (the model's, which imports only torch) is a
    `UserError` like the others."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ValueError as ex:
        if len(ex.args) != 2:
            raise
        raise UserError(*ex.args) from ex
    except OmegaConfBaseException as ex:
        raise _invalid(ex) from ex


def _invalid(ex: OmegaConfBaseException) -> UserError:
    key = getattr(ex, "full_key", None) or "?"
    reason = str(ex).splitlines()[0]
    return UserError(
        f"invalid config value at '{key}': {reason}",
        "check the key's spelling and type; `--cfg job` prints the composed config",
    )


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


def _typed_options(cfg: DictConfig) -> None:
    """Each component option's node, typed by the class its `_target_` names (a saved config is plain data)."""
    nodes = [(cfg, group) for group in OPTION_GROUPS] + [(cfg.logger, name) for name in cfg.logger]
    for parent, key in nodes:
        node = parent[key]
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        try:
            schema = get_class(target) if isinstance(target, str) else None
        except (ImportError, ValueError):
            schema = None
        if schema is None or not is_dataclass(schema):
            where = f"{parent._get_full_key(None)}.{key}".lstrip(".")
            raise UserError(
                f"{where} is not an option of a config group (_target_={target})",
                f"pick one of the options in conf/{where.split('.')[0]}/ ({where}=<option>)",
            )
        parent[key] = OmegaConf.merge(OmegaConf.structured(schema), node)


def train_config(cfg: DictConfig | dict[str, Any], world_size: int = 1) -> TrainConfig:
    """The typed run config (each component option an instance of its class), checked throughout."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        _typed_options(merged)
    except OmegaConfBaseException as ex:
        raise _invalid(ex) from ex
    typed = to_dataclass(merged, TrainConfig)
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
    _require(typed.workers is None or typed.workers >= 1, "workers must be >= 1", "or null for every core")
    _require(typed.task_mb >= 1, "task_mb must be >= 1", "e.g. 4")
    return typed


def peek_config(cfg: DictConfig) -> PeekConfig:
    typed = to_dataclass(cfg, PeekConfig)
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


store = ConfigStore.instance()
store.store(group="schema", name="train", node=TrainConfig)
for group, schema in (
    ("model", GPTConfig),
    ("data", DataConfig),
    ("system", SystemConfig),
    ("paths", PathsConfig),
    ("hellaswag", HellaswagConfig),
):
    store.store(group=f"schema/{group}", name="default", node=schema)
