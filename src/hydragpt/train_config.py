"""A training run's typed config: the model's shape, the component groups' options and the loop's knobs.

Importing this module registers the schemas that conf/train.yaml composes: the model's (`GPTConfig`,
beside the model) and the component options' (`@option` classes in engine/optim.py, engine/schedule.py,
engine/parallel.py and the loggers), which import torch. `train_config` converts a composed (or saved)
config into these dataclasses, each option an instance of its class, and runs every check.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The component options register their schemas when their modules are imported.
from hydragpt.config import (
    DTYPES,
    MAX_NEW_TOKENS,
    STOPPABLE_SIGNALS,
    DataConfig,
    HellaswagConfig,
    PathsConfig,
    SuiteConfig,
    SystemConfig,
    check_choice,
    invalid_value,
    only_with,
    require,
    to_dataclass,
    validate_device,
    validate_include_path,
    validate_seed,
)
from hydragpt.engine import optim, parallel, schedule  # noqa: F401
from hydragpt.errors import UserError
from hydragpt.loggers import csv_logger, tensorboard_logger, wandb_logger  # noqa: F401
from hydragpt.model import GPTConfig

# Optional[...] rather than `X | None` below: OmegaConf's structured configs read these annotations.
# ruff: noqa: UP045

OPTION_GROUPS = ("optim", "lr", "ddp")  # groups whose options are classes (`_target_`), besides the logger's trackers


def at_evaluations(key: str, interval: Optional[int], eval_interval: int, what: str) -> None:
    """An interval of something done at evaluations (`what` happens then) is null or a multiple of theirs."""
    if interval is not None:
        require(
            interval >= 1 and interval % eval_interval == 0,
            f"{key}={interval} is not a multiple of train.eval_interval={eval_interval}",
            f"{what} at evaluations: use a multiple of eval_interval, or null",
        )


@dataclass
class TrainLoopConfig:
    """How long and how a run trains, evaluates and logs."""

    max_iters: int = 2000  # optimizer steps to train for
    max_tokens: Optional[int] = None  # or train for this many tokens: max_iters = ceil(max_tokens / tokens per step)
    epochs: Optional[float] = None  # or this many passes over the training split (sequential sampling, or chat data)
    batch_size: Any = 12  # sequences per micro-batch (per device), or auto: the largest that fits (see below)
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
    eval_suite_interval: Optional[int] = (
        None  # also score the suite (suite=core_small) at evaluations whose step is a multiple of this
    )
    sample_interval: Optional[int] = None  # also write a sample at evaluations whose step is a multiple of this
    sample_start: str = "\n"  # the in-training samples' prompt
    sample_tokens: int = 200  # tokens per in-training sample
    plot: bool = True  # write plots/metrics.png at the end of training
    report: bool = True  # and report.md (scripts/report.py writes it at any time)

    def __post_init__(self) -> None:
        require(self.max_iters >= 0, "train.max_iters must be >= 0", "set a non-negative count")
        require(
            self.max_tokens is None or self.epochs is None,
            "train.max_tokens and train.epochs are both set",
            "give the run's length one way: max_iters, max_tokens or epochs",
        )
        require(self.max_tokens is None or self.max_tokens >= 1, "train.max_tokens must be >= 1", "or null")
        require(self.epochs is None or self.epochs > 0, "train.epochs must be > 0", "e.g. train.epochs=1, or null")
        for key in ("eval_interval", "eval_iters", "log_interval"):
            value = getattr(self, key)
            require(value >= 1, f"train.{key} must be >= 1, got {value}", "set a positive count")
        if self.batch_size == "auto":
            require(
                self.total_batch_size is not None,
                "train.batch_size=auto needs train.total_batch_size: the accumulation is derived from it",
                "set the tokens per optimizer step, e.g. train.total_batch_size=524288",
            )
        else:
            require(
                type(self.batch_size) is int and self.batch_size >= 1,
                f"train.batch_size must be a count >= 1 or auto, got {self.batch_size}",
                "e.g. train.batch_size=12, or train.batch_size=auto with train.total_batch_size",
            )
        require(
            self.grad_accum_steps is not None or self.total_batch_size is not None,
            "train.grad_accum_steps and train.total_batch_size are both null",
            "set train.grad_accum_steps=1, or the tokens per step in train.total_batch_size",
        )
        if self.total_batch_size is not None:
            require(
                self.total_batch_size >= 1, "train.total_batch_size must be >= 1", "or null to use grad_accum_steps"
            )
            require(
                self.grad_accum_steps in (None, 1),
                f"train.grad_accum_steps={self.grad_accum_steps} has no effect: train.total_batch_size derives it",
                "give one of them: train.grad_accum_steps=null, or train.total_batch_size=null",
            )
        elif self.grad_accum_steps is not None:
            require(self.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1", "set a positive count")
        if self.crop_block_size is not None:
            require(self.crop_block_size >= 1, "train.crop_block_size must be >= 1", "or null to keep the block size")
            require(
                self.init_from != "scratch", "train.crop_block_size only applies with train.init_from", "or set it null"
            )
        at_evaluations("train.hellaswag_interval", self.hellaswag_interval, self.eval_interval, "HellaSwag is scored")
        at_evaluations("train.sample_interval", self.sample_interval, self.eval_interval, "samples are written")
        at_evaluations("train.eval_suite_interval", self.eval_suite_interval, self.eval_interval, "suites are scored")
        require(
            1 <= self.sample_tokens <= MAX_NEW_TOKENS,
            f"train.sample_tokens must be in [1, {MAX_NEW_TOKENS:,}], got {self.sample_tokens}",
            "e.g. train.sample_tokens=200",
        )
        for name in ("sample_start", "sample_tokens"):
            only_with(self, name, self.sample_interval is not None, "train.sample_interval", "train.")
        only_with(self, "hellaswag_examples", self.hellaswag_interval is not None, "train.hellaswag_interval", "train.")
        examples = self.hellaswag_examples
        require(examples is None or examples >= 1, "train.hellaswag_examples must be >= 1", "or null for all")
        require(self.grad_clip >= 0, "train.grad_clip must be >= 0", "use 0 to disable clipping")
        require(self.skip_nonfinite >= 0, "train.skip_nonfinite must be >= 0", "use 0 to stop at the first nan/inf")
        for name in self.stop_signals:
            require(
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
        require(self.keep_last >= 0, f"checkpoint.keep_last must be >= 0, got {self.keep_last}", "use 0 to keep none")


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
    suite: Optional[SuiteConfig] = None  # a benchmark suite of conf/suite/, for train.eval_suite_interval
    resume: Optional[str] = None  # a run directory to continue exactly where it stopped (its config + these overrides)

    def __post_init__(self) -> None:
        """Checks across groups (each group checked its own knobs already)."""
        require(
            self.train.epochs is None or self.data.sampling == "sequential" or self.data.format == "chat",
            "train.epochs needs data.sampling=sequential (random windows have no epochs)",
            "set data.sampling=sequential, or use train.max_iters / train.max_tokens",
        )
        at_evaluations(
            "checkpoint.keep_every", self.checkpoint.keep_every, self.train.eval_interval, "checkpoints are written"
        )
        scores_suite = self.train.eval_suite_interval is not None
        require(
            scores_suite == (self.suite is not None),
            "train.eval_suite_interval and suite= go together",
            "give both, e.g. suite=core_small train.eval_suite_interval=1000, or neither",
        )
        require(
            not (scores_suite and isinstance(self.ddp, parallel.FullySharded)),
            "train.eval_suite_interval cannot run under ddp=fsdp: lm-eval's requests give the ranks different"
            " numbers of forward passes, and a sharded forward needs them all",
            "score the suite on saved checkpoints instead: python scripts/eval.py task=lm_eval suite=<name> ckpt=<run>",
        )
        if scores_suite:
            validate_include_path(self.suite.include_path, "suite.include_path")  # type: ignore[union-attr]
        if isinstance(self.optim, optim.Muon):  # a tied head is the token table, which takes embedding_lr
            only_with(self.optim, "head_lr", not self.model.tie_embeddings, "model.tie_embeddings=false", "optim.")


@dataclass
class BenchSampleConfig:
    """scripts/bench_sample.py: generation with the KV cache against recomputing the context, greedy, on one model
    (a checkpoint, or `model` with random weights), alternated A B A B; both must produce the same tokens."""

    model: GPTConfig = field(default_factory=GPTConfig)
    ckpt: Optional[str] = None  # a checkpoint or run directory to sample from (null: `model` with random weights)
    vocab_size: int = 65  # vocabulary of the random model (65: Shakespeare's characters)
    prompt_tokens: int = 16  # random prompt length
    max_new_tokens: int = 500  # tokens generated per sample and mode
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])  # sequences generated together, each measured
    repeats: int = 2  # rounds, each running every batch size in both modes
    compile: bool = False  # the cache mode's one-token step through torch.compile (compiled before timing)
    device: str = "cpu"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "float32"  # float32, bfloat16, float16 (auto: bfloat16 on GPUs)
    seed: int = 1337  # random weights and prompt


def _steps_of(total: int, factors: dict[str, int]) -> int:
    """How many times the product of `factors` (knob name -> value) goes into `train.total_batch_size`,
    refused when not a whole number."""
    per_step = math.prod(factors.values())
    if total % per_step != 0:
        nearest = per_step * math.ceil(total / per_step)
        raise UserError(
            f"train.total_batch_size={total} is not divisible by {' x '.join(factors)} ="
            f" {' x '.join(str(v) for v in factors.values())} = {per_step}",
            f"use a multiple of {per_step}, e.g. {nearest}",
        )
    return total // per_step


def sequences_per_rank(t: TrainLoopConfig, block_size: int, world_size: int) -> int:
    """The sequences each rank contributes to an optimizer step of `train.total_batch_size` tokens."""
    assert t.total_batch_size is not None
    return _steps_of(t.total_batch_size, {"block_size": block_size, "world_size": world_size})


def grad_accum_steps(t: TrainLoopConfig, block_size: int, world_size: int = 1) -> int:
    """Micro-steps per optimizer step: derived from the total tokens per step when that is set, else given."""
    if t.total_batch_size is None:
        assert t.grad_accum_steps is not None
        return t.grad_accum_steps
    factors = {"batch_size": t.batch_size, "block_size": block_size, "world_size": world_size}
    return _steps_of(t.total_batch_size, factors)


def _locate(target: str) -> Any:
    """The object a dotted `module.Name` path names, or None (quietly, unlike Hydra's own lookup)."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None


def _typed_options(cfg: DictConfig) -> None:
    """Each component option's node, typed by the class its `_target_` names (a saved config is plain data)."""
    nodes = [(cfg, group) for group in OPTION_GROUPS] + [(cfg.logger, name) for name in cfg.logger]
    for parent, key in nodes:
        node = parent[key]
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        schema = _locate(target) if isinstance(target, str) else None
        if schema is None or not is_dataclass(schema):
            where = f"{parent._get_full_key(None)}.{key}".lstrip(".")
            named = f" (_target_={target})" if target is not None else ""
            group = where.split(".")[0]
            fix = f"pick one of the options in conf/{group}/: {where}=<option>"
            if parent is not cfg:  # a tracker under logger
                fix = f"drop what added {where}; trackers are added with logger=<option> or logger=[a,b] (conf/logger/)"
            raise UserError(f"{where} is not an option of a config group{named}", fix)
        parent[key] = OmegaConf.merge(OmegaConf.structured(schema), node)


def train_config(cfg: DictConfig | dict[str, Any], world_size: int = 1) -> TrainConfig:
    """The typed run config (each component option an instance of its class), checked throughout."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        _typed_options(merged)
    except OmegaConfBaseException as ex:
        raise invalid_value(ex) from ex
    typed = to_dataclass(merged, TrainConfig)
    if typed.train.init_from == "scratch":  # from a checkpoint, the block size is only known once loaded
        check_batch = sequences_per_rank if typed.train.batch_size == "auto" else grad_accum_steps
        check_batch(typed.train, typed.model.block_size, world_size)
    return typed


def bench_sample_config(cfg: DictConfig) -> BenchSampleConfig:
    typed = to_dataclass(cfg, BenchSampleConfig)
    for key in ("vocab_size", "prompt_tokens", "max_new_tokens", "repeats"):
        require(getattr(typed, key) >= 1, f"{key} must be >= 1, got {getattr(typed, key)}", "set a positive count")
    require(
        bool(typed.batch_sizes) and min(typed.batch_sizes) >= 1,
        f"batch_sizes must be counts >= 1, got {typed.batch_sizes}",
        "e.g. batch_sizes=[1,8]",
    )
    require(
        typed.max_new_tokens <= MAX_NEW_TOKENS,
        f"max_new_tokens={typed.max_new_tokens} is more than sample.py generates in one call ({MAX_NEW_TOKENS:,})",
        "e.g. max_new_tokens=500",
    )
    validate_device(typed.device, "device")
    check_choice(typed.dtype, DTYPES, "dtype")
    validate_seed(typed.seed, "seed")
    return typed


# The depth flavours' shape, from model.depth alone (conf/model/modern_gpu.yaml): 64 wide per layer and
# heads of 128, as nanochat's.
WIDTH_PER_LAYER, HEAD_SIZE = 64, 128
OmegaConf.register_new_resolver("hydragpt.depth_width", lambda depth: WIDTH_PER_LAYER * depth, replace=True)
OmegaConf.register_new_resolver(
    "hydragpt.depth_heads", lambda depth: max(1, WIDTH_PER_LAYER * depth // HEAD_SIZE), replace=True
)

store = ConfigStore.instance()
store.store(group="schema", name="train", node=TrainConfig)
store.store(group="schema", name="bench_sample", node=BenchSampleConfig)
store.store(group="schema/model", name="default", node=GPTConfig)
