"""Typed configuration: every knob's type, default and one-line doc, in one place, checked when composed.

The schemas here (data, system, paths and every script's own knobs) need no torch, so preparing or peeking
at data starts fast; a training run's schema (model, component options, loop) is in train_config.py. They
are registered in Hydra's ConfigStore; conf/*.yaml extend them and set only the values they change.
Composition itself refuses unknown keys and values of the wrong type; the conversion to dataclasses
(`sample_config`, ...) runs each class's own checks (`__post_init__`) and the cross-field ones, and gives
back plain objects, or a `UserError` that names the bad value and how to fix it, before any work.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from hydragpt.data.dataset import SPLITS
from hydragpt.data.tokenizer import tiktoken_encodings
from hydragpt.errors import UserError

# Optional[...] rather than `X | None` below: OmegaConf's structured configs read these annotations.
# ruff: noqa: UP045

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("highest", "high", "medium")
VAL_SPLITS = ("tail", "docs", "head")
DATA_FORMATS = ("text", "chat")
HELLASWAG_METHODS = ("lm_eval", "build_nanogpt")
SAMPLING = ("random", "sequential")
SAMPLE_FORMATS = ("text", "jsonl")
MAX_NEW_TOKENS = 1_000_000  # per sample and call: an hour or more of generation on a CPU, a few MB of text
# Signals that may stop training with a checkpoint (SIGKILL and SIGSTOP cannot be caught); those a
# platform lacks (SIGUSR1 on Windows) are ignored there.
STOPPABLE_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")


def require(ok: bool, what: str, fix: str) -> None:
    if not ok:
        raise UserError(what, fix)


def only_with(config: Any, name: str, active: bool, needs: str, prefix: str = "") -> None:
    """A knob that acts only when `needs` holds is refused when set otherwise: it would be recorded and
    ignored. Set means: not its default."""
    value = getattr(config, name)
    default = next(
        f.default_factory() if f.default is NO_DEFAULT else f.default  # type: ignore[misc]
        for f in fields(config)
        if f.name == name
    )
    typed = "null" if default is None else json.dumps(default) if isinstance(default, str) else default
    require(
        active or value == default,
        f"{prefix}{name}={value} has no effect without {needs}",
        f"set {needs} too, or leave {prefix}{name} at its default: {prefix}{name}={typed}",
    )


def check_choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    require(value in allowed, f"unknown {key} '{value}'", f"use one of: {', '.join(allowed)}")


@dataclass
class DataConfig:
    """A dataset: where its text comes from, how it is tokenized and split, and how batches are drawn."""

    name: str = "text"  # directory under paths.data_dir
    source: Optional[str] = None  # .txt, .jsonl, .parquet; a directory or glob of them; a URL; hf:<dataset>
    hf_name: Optional[str] = None  # Hugging Face config name (hf: sources only)
    hf_split: str = "train"  # Hugging Face split to read (hf: sources only)
    streaming: bool = False  # stream a Hugging Face dataset instead of downloading it first
    text_field: str = "text"  # field holding the text in .jsonl/.parquet/Hugging Face rows
    tokenizer: str = "gpt2"  # char, a tiktoken encoding (gpt2, cl100k_base, ...), or a file of train_tokenizer.py
    val_split: str = "tail"  # tail: last val_fraction of the characters; docs: random documents; head: first val_tokens
    val_fraction: Optional[float] = 0.1  # share held out for val (tail, docs)
    val_tokens: Optional[int] = None  # tokens held out for val (head)
    split_seed: int = 2357  # which documents go to val (docs)
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB of uint16)
    sampling: str = "sequential"  # sequential: each window/conversation once an epoch; random: random windows/order
    format: str = "text"  # text: documents; chat: conversations, with a loss on the assistant's replies only
    prompt_field: Optional[str] = None  # chat: a question/answer dataset's question (null: text_field has messages)
    response_field: Optional[str] = None  # chat: and its answer; each record is one user and one assistant turn
    max_conversation_tokens: int = 2048  # chat: longer conversations are cut between turns into documents this long

    def __post_init__(self) -> None:
        require(
            bool(self.name) and "/" not in self.name and "\\" not in self.name and self.name not in (".", ".."),
            f"data.name '{self.name}' is not a plain directory name",
            "datasets live directly under paths.data_dir: use a name such as shakespeare_char",
        )
        validate_tokenizer(self.tokenizer, "data.tokenizer")
        check_choice(self.val_split, VAL_SPLITS, "data.val_split")
        check_choice(self.sampling, SAMPLING, "data.sampling")
        only_with(self, "val_tokens", self.val_split == "head", "data.val_split=head", "data.")
        only_with(self, "split_seed", self.val_split == "docs", "data.val_split=docs", "data.")
        if self.val_split == "head":
            require(
                self.val_tokens is not None and self.val_tokens >= 1,
                f"data.val_split=head needs data.val_tokens >= 1, got {self.val_tokens}",
                "e.g. data.val_tokens=100000000, the first shard",
            )
        else:
            require(
                self.val_fraction is not None and 0 < self.val_fraction < 1,
                f"data.val_split={self.val_split} needs data.val_fraction in (0, 1), got {self.val_fraction}",
                "e.g. data.val_fraction=0.1",
            )
        require(self.shard_tokens >= 1, "data.shard_tokens must be >= 1", "e.g. 100000000 (200 MB of uint16)")
        validate_seed(self.split_seed, "data.split_seed")
        check_choice(self.format, DATA_FORMATS, "data.format")
        chat = self.format == "chat"
        for knob in ("prompt_field", "response_field", "max_conversation_tokens"):
            only_with(self, knob, chat, "data.format=chat", "data.")
        require(
            (self.prompt_field is None) == (self.response_field is None),
            "data.prompt_field and data.response_field go together",
            "set both (each record is then one question and its answer), or neither (text_field holds messages)",
        )
        if chat:
            require(
                self.val_split == "docs",
                f"data.format=chat holds out whole conversations, not data.val_split={self.val_split}",
                "use data.val_split=docs",
            )
            require(
                self.tokenizer != "char",
                "data.format=chat needs a tokenizer that can hold the chat template's tokens, not data.tokenizer=char",
                "use a tiktoken encoding (gpt2) or a tokenizer of scripts/train_tokenizer.py",
            )
            require(
                self.max_conversation_tokens >= 8,
                f"data.max_conversation_tokens={self.max_conversation_tokens} cannot hold a turn",
                "e.g. the model's block_size + 1",
            )


@dataclass
class SystemConfig:
    """The device and numerics a run uses."""

    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bfloat16 on GPUs that have it, float32 elsewhere), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model: faster steps on GPUs after a one-off compile
    activation_checkpointing: bool = False  # recompute each block in the backward: less memory, ~1/3 more compute
    matmul_precision: str = "high"  # float32 matmuls: highest (exact fp32), high (TF32 on GPUs), medium (bf16)
    seed: int = 1337  # seeds init, data order and dropout: same seed, same run
    peak_flops: Optional[float] = None  # the device's peak FLOP/s for MFU; null looks it up in a table

    def __post_init__(self) -> None:
        validate_device(self.device, "system.device")
        check_choice(self.dtype, DTYPES, "system.dtype")
        check_choice(self.matmul_precision, MATMUL_PRECISIONS, "system.matmul_precision")
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
    method: str = "lm_eval"  # lm_eval (its prompt; acc_norm per character) or build_nanogpt (ctx; per token)
    url: str = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"  # where from

    def __post_init__(self) -> None:
        check_choice(self.method, HELLASWAG_METHODS, "hellaswag.method")


@dataclass
class SampleConfig:
    """scripts/sample.py: continue a prompt with a trained model (the checkpoint carries model and tokenizer)."""

    ckpt: str = "latest"  # a checkpoint file, a run directory, or "latest" (the newest last.pt under paths.output_dir)
    init_from: Optional[str] = None  # or a pretrained GPT-2 instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl, hf:<dir>
    start: str = "\n"  # the prompt, or FILE:<path> to read it from a file
    num_samples: int = 3  # independent continuations, generated as one batch
    max_new_tokens: int = 500  # tokens to generate per sample
    temperature: float = 0.8  # <1 sharper, >1 more random; 0 is greedy (always the most likely token)
    top_k: Optional[int] = 200  # sample only among the k most likely tokens (null: all)
    top_p: Optional[float] = None  # nucleus sampling: the most likely tokens covering this probability mass (null: off)
    seed: int = 1337  # same seed, same checkpoint, same settings: same samples
    device: str = "auto"  # auto (cuda, mps, else cpu), cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (bfloat16 on GPUs, float32 on CPU), float32, bfloat16, float16
    use_cache: bool = True  # KV cache: each new token costs one position, not the whole context (false: recompute)
    compile: bool = False  # torch.compile the cached one-token step (static shapes): faster after a one-off compile
    stop: list[str] = field(default_factory=list)  # end a sample at the first of these strings, e.g. stop=['\n\n']
    out: Optional[str] = None  # also write the samples to this file
    format: str = "text"  # text: samples separated by a line of dashes; jsonl: one JSON object per sample
    chat: bool = False  # interactive: a conversation with a chat-trained model, else each typed line continued
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class PrepareConfig:
    """scripts/prepare.py: turn a raw corpus into token shards under <paths.data_dir>/<data.name>/."""

    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    overwrite: bool = False  # redo a prepared dataset (an interrupted one continues unless this is set)
    workers: Optional[int] = None  # processes tokenizing in parallel (null: every core)
    task_mb: int = 1  # MB of text per tokenization task; two tasks per worker are in flight, so memory stays flat


@dataclass
class TrainTokenizerConfig:
    """scripts/train_tokenizer.py: a byte-level BPE learned from a dataset's source (data=<option>)."""

    data: DataConfig = field(default_factory=DataConfig)  # where the text comes from (data.source); its val share
    paths: PathsConfig = field(default_factory=PathsConfig)
    vocab_size: int = 32768  # tokens in all: the 256 byte values, the merges, and 5 special tokens
    max_chars: int = 2_000_000_000  # learn from at most this many characters of the training share (memory)
    out: Optional[str] = None  # the tokenizer file (null: <paths.data_dir>/tokenizers/<data.name>_<vocab_size>.json)


@dataclass
class PeekConfig:
    """scripts/peek.py: decode and print tokens of a prepared dataset, to check what a model will read."""

    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    split: str = "train"  # train or val
    offset: int = 0  # first token to show
    n_tokens: int = 200  # how many tokens to decode
    ids: bool = False  # also print the token ids


@dataclass
class BenchPrepareConfig:
    """scripts/bench_prepare.py: preparation throughput and peak memory, one process against a worker pool."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    size_mb: int = 200  # size of the generated .jsonl corpus
    workers: list[int] = field(default_factory=lambda: [1, 2])  # worker counts compared, alternated in each round
    repeats: int = 2  # rounds (A B A B: the machine may be noisy)
    tokenizer: str = "gpt2"  # data.tokenizer for the runs
    task_mb: int = 1  # MB of text per tokenization task
    seed: int = 0  # corpus generator seed
    work_dir: str = "${paths.data_dir}/bench_prepare"  # the corpus and the prepared outputs


@dataclass
class SuiteTask:
    """One task of a suite: which lm-eval task, which of its metrics, and what random guessing scores."""

    task: str = MISSING  # an lm-eval task name, e.g. hellaswag
    metric: str = "acc"  # the metric the suite reads (lm-eval's name: acc, acc_norm, ...), higher is better
    num_fewshot: int = 0  # examples shown before each question
    random_baseline: float = 0.0  # the metric's value for random guessing (0.25 for 4 choices)

    def __post_init__(self) -> None:
        require(
            0 <= self.random_baseline < 1,
            f"suite task {self.task}: random_baseline must be in [0, 1), got {self.random_baseline}",
            "give the metric's value for random guessing, e.g. 0.25 for 4 choices",
        )


@dataclass
class SuiteConfig:
    """A benchmark suite (conf/suite/): tasks scored together into one number, the mean over its tasks of
    each score centred on its random baseline, (x - baseline) / (1 - baseline): 0 is guessing, 1 is perfect."""

    name: str = MISSING  # the suite's name, the key of its score in results and evaluation records
    tasks: list[SuiteTask] = field(default_factory=list)  # the tasks, each with its metric and baseline
    limit: Optional[int] = None  # score only the first this many examples of each task (null: all)
    include_path: Optional[str] = None  # a directory of task YAML files the suite's tasks may come from

    def __post_init__(self) -> None:
        require(bool(self.tasks), f"suite {self.name} has no tasks", "list them under tasks: in its YAML")
        require(self.limit is None or self.limit >= 1, "suite.limit must be >= 1", "or null for every example")
        names = [t.task for t in self.tasks]
        require(len(set(names)) == len(names), f"suite {self.name} lists a task twice", "list each task once")


@dataclass
class LmEvalConfig:
    """eval.py task=lm_eval: tasks of EleutherAI's lm-evaluation-harness (pip install 'hydragpt[eval]')."""

    tasks: list[str] = field(default_factory=list)  # lm-eval task or group names, e.g. [hellaswag,arc_easy,piqa]
    num_fewshot: Optional[int] = None  # examples shown before each question (null: each task's own default)
    include_path: Optional[str] = None  # a directory of your own task YAML files, found beside lm-eval's
    bootstrap_iters: int = 1000  # resamples for the stderr of metrics without a closed form (0: none)


@dataclass
class EvalConfig:
    """scripts/eval.py: score a model: loss over a whole split, HellaSwag accuracy, or lm-eval tasks."""

    ckpt: str = "latest"  # a checkpoint file, a run directory, or "latest" (the newest last.pt under paths.output_dir)
    init_from: Optional[str] = None  # or a pretrained GPT-2 instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl, hf:<dir>
    task: str = "val_loss"  # val_loss, hellaswag or lm_eval
    split: str = "val"  # val_loss: the split of the checkpoint's dataset (under paths.data_dir) to score
    dataset: Optional[str] = None  # val_loss: the prepared dataset to score (null: the one the checkpoint trained on)
    batch_size: int = 8  # val_loss, lm_eval: sequences per forward (hellaswag: one example, 4 endings, per forward)
    device: str = "auto"  # auto (cuda, mps, else cpu), cpu, cuda, mps; cuda:LOCAL_RANK under torchrun
    dtype: str = "auto"  # auto (bfloat16 on GPUs, float32 on CPU), float32, bfloat16, float16
    limit: Optional[int] = None  # score only the first this many windows or chat rows (val_loss), examples (tasks)
    show_examples: int = 0  # hellaswag: print this many worked examples (context, endings with losses, prediction)
    out: Optional[str] = (
        None  # also write the result JSON here (hellaswag, lm_eval: each example's scores to <out>.examples.jsonl)
    )
    hellaswag: HellaswagConfig = field(default_factory=HellaswagConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)
    suite: Optional[SuiteConfig] = None  # task=lm_eval: a suite of conf/suite/ (suite=core_small) besides the tasks
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class ExportConfig:
    """scripts/export.py: a checkpoint's model as a Hugging Face GPT-2 directory (transformers loads it)."""

    ckpt: str = "latest"  # a checkpoint file, a run directory, or "latest" (the newest last.pt under paths.output_dir)
    out: str = MISSING  # the directory to write: config.json, model.safetensors (tokenizer.json for GPT-2's tokenizer)
    paths: PathsConfig = field(default_factory=PathsConfig)


@dataclass
class PlotConfig:
    """scripts/plot.py: draw a run's curves or a sweep's val losses side by side (exactly one of the two)."""

    run: Optional[str] = None  # a run directory: writes <run>/plots/metrics.png (loss, lr, grad norm, tokens/s)
    sweep: Optional[str] = None  # a multirun directory: writes <sweep>/val_loss.png with every job's val loss curve


@dataclass
class ReportConfig:
    """scripts/report.py: report.md for a run (config, hardware, speed, evaluations, curves, samples) or a
    sweep (its jobs side by side)."""

    run: str = MISSING  # a run directory, or a sweep's (multirun/<date>/<time>): writes <run>/report.md
    samples: int = 2  # continuations from the newest checkpoint when the run wrote no samples itself (0: none)
    sample_tokens: int = 100  # tokens per such sample
    plot: bool = True  # draw plots/metrics.png first when the run has none yet


Schema = TypeVar("Schema")


def to_dataclass(cfg: DictConfig | dict[str, Any], schema: type[Schema]) -> Schema:
    """Check `cfg` against `schema` (unknown keys, wrong types, missing values), convert it, and run each
    class's own checks; a check's `ValueError(what, fix)` (the model's, which imports only torch) is a
    `UserError` like the others."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        typed = OmegaConf.to_object(merged)
    except ValueError as ex:
        if len(ex.args) != 2:
            raise
        raise UserError(*ex.args) from ex
    except OmegaConfBaseException as ex:
        raise invalid_value(ex) from ex
    check_numbers(typed)
    return typed  # type: ignore[return-value]


INT64_MAX = 2**63 - 1


def check_numbers(node: Any, key: str = "", fix: str = "") -> None:
    """Every number in a config is finite, not negative, and an integer fits in 64 bits: no knob means
    anything else, whatever its own checks (which narrow its range further) forgot. Walks dataclasses,
    dicts and lists; `fix` suggests the knob's default."""
    if is_dataclass(node):
        for f in fields(node):
            name = f"{key}.{f.name}".lstrip(".")
            fix = f"e.g. its default, {name}={f.default}" if f.default not in (NO_DEFAULT, None) else ""
            check_numbers(getattr(node, f.name), name, fix or f"or {name}=null for the default")
    elif isinstance(node, dict):
        for name, value in node.items():
            check_numbers(value, f"{key}.{name}".lstrip("."), fix)
    elif isinstance(node, list):
        for value in node:
            check_numbers(value, key, "give numbers >= 0 in the list")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        require(not isinstance(node, float) or math.isfinite(node), f"{key}={node} is not a finite number", fix)
        require(node >= 0, f"{key} must be >= 0, got {node}", fix)
        require(node <= INT64_MAX, f"{key}={node} is out of range (integers must fit in 64 bits)", fix)


def invalid_value(ex: OmegaConfBaseException) -> UserError:
    key = getattr(ex, "full_key", None) or "?"
    reason = str(ex).splitlines()[0]
    if isinstance(ex, MissingMandatoryValue):
        return UserError(f"{key} has no value and needs one", f"give {key}=<value>")
    return UserError(
        f"invalid config value at '{key}': {reason}",
        "check the key's spelling and type; `--cfg job` prints the composed config",
    )


def validate_seed(seed: int, key: str) -> None:
    require(0 <= seed < 2**32, f"{key} must be in [0, 2^32), got {seed}", "use a non-negative 32-bit seed, e.g. 1337")


def validate_device(device: str, key: str) -> None:
    kind, colon, index = device.partition(":")
    check_choice(kind, DEVICES, key)
    require(
        not colon or (kind == "cuda" and index.isdigit() and len(index) <= 4),
        f"bad {key} '{device}'",
        "use auto, cpu, mps, cuda or cuda:<index>",
    )


def validate_output_file(out: str | None, key: str) -> None:
    """Before any work: a file `out` names could be created (missing directories are made on writing)."""
    if not out:
        return
    path = Path(out).expanduser()
    require(not path.is_dir(), f"{key}={out} is a directory", f"give a file name, e.g. {key}={path / 'result.txt'}")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    require(
        existing.is_dir() and os.access(existing, os.W_OK),
        f"cannot write {key}={out}: {existing} is not a writable directory",
        f"choose another {key}",
    )


def validate_include_path(path: str | None, key: str) -> None:
    require(
        path is None or Path(path).is_dir(), f"{key}={path} is not a directory", "give a directory of task YAML files"
    )


def validate_tokenizer(name: str, key: str) -> None:
    if name.endswith(".json"):  # a tokenizer of one's own, from scripts/train_tokenizer.py
        require(
            Path(name).expanduser().is_file(),
            f"{key}={name}: no such tokenizer file",
            "train it first: python scripts/train_tokenizer.py data=<option>",
        )
    elif name != "char":  # tiktoken's list of encodings is only looked up when needed
        check_choice(name, ("char", *tiktoken_encodings()), key)


def sample_config(cfg: DictConfig) -> SampleConfig:
    typed = to_dataclass(cfg, SampleConfig)
    require(typed.num_samples >= 1, f"num_samples must be >= 1, got {typed.num_samples}", "e.g. num_samples=3")
    require(
        typed.max_new_tokens <= MAX_NEW_TOKENS,
        f"max_new_tokens={typed.max_new_tokens} is more than sample.py generates in one call ({MAX_NEW_TOKENS:,})",
        "ask for fewer, or sample several times with different seeds",
    )
    require(
        typed.temperature >= 0,
        f"temperature must be >= 0, got {typed.temperature}",
        "use temperature=0 for greedy decoding or a positive value such as 0.8",
    )
    require(typed.top_k is None or typed.top_k >= 1, f"top_k must be >= 1, got {typed.top_k}", "or top_k=null")
    require(
        typed.top_p is None or 0 < typed.top_p <= 1,
        f"top_p must be in (0, 1], got {typed.top_p}",
        "or top_p=null",
    )
    validate_device(typed.device, "device")
    check_choice(typed.dtype, DTYPES, "dtype")
    validate_seed(typed.seed, "seed")
    check_choice(typed.format, SAMPLE_FORMATS, "format")
    require(all(typed.stop), "stop strings must not be empty", "e.g. stop=['\\n\\n']")
    validate_output_file(typed.out, "out")
    for name in ("start", "num_samples", "out", "format"):
        only_with(typed, name, not typed.chat, "chat=false")  # a chat reads its prompts from the input
    return typed


def prepare_config(cfg: DictConfig) -> PrepareConfig:
    typed = to_dataclass(cfg, PrepareConfig)
    require(typed.workers is None or typed.workers >= 1, "workers must be >= 1", "or null for every core")
    require(typed.task_mb >= 1, "task_mb must be >= 1", "e.g. 4")
    return typed


def train_tokenizer_config(cfg: DictConfig) -> TrainTokenizerConfig:
    typed = to_dataclass(cfg, TrainTokenizerConfig)
    require(typed.max_chars >= 1, "max_chars must be >= 1", "e.g. max_chars=1000000000")
    require(
        typed.data.val_split == "tail" and (typed.data.val_fraction or 0) > 0,
        "the compression report needs held-out text: data.val_split=tail with data.val_fraction > 0",
        "e.g. data.val_split=tail data.val_fraction=0.1",
    )
    validate_output_file(typed.out, "out")
    return typed


def peek_config(cfg: DictConfig) -> PeekConfig:
    typed = to_dataclass(cfg, PeekConfig)
    check_choice(typed.split, ("train", "val"), "split")
    require(typed.offset >= 0, "offset must be >= 0", "e.g. offset=0")
    require(typed.n_tokens >= 1, "n_tokens must be >= 1", "e.g. n_tokens=200")
    return typed


def bench_prepare_config(cfg: DictConfig) -> BenchPrepareConfig:
    typed = to_dataclass(cfg, BenchPrepareConfig)
    require(typed.size_mb >= 1, "size_mb must be >= 1", "e.g. size_mb=200")
    require(bool(typed.workers) and min(typed.workers) >= 1, "workers must list counts >= 1", "e.g. workers=[1,2]")
    require(typed.repeats >= 1, "repeats must be >= 1", "e.g. repeats=2")
    require(typed.task_mb >= 1, "task_mb must be >= 1", "e.g. 4")
    validate_seed(typed.seed, "seed")
    validate_tokenizer(typed.tokenizer, "tokenizer")
    return typed


EVAL_TASKS = ("val_loss", "hellaswag", "lm_eval")


def eval_config(cfg: DictConfig) -> EvalConfig:
    typed = to_dataclass(cfg, EvalConfig)
    check_choice(typed.task, EVAL_TASKS, "task")
    check_choice(typed.split, SPLITS, "split")
    require(typed.batch_size >= 1, f"batch_size must be >= 1, got {typed.batch_size}", "e.g. batch_size=8")
    require(typed.limit is None or typed.limit >= 1, "limit must be >= 1", "or null for everything")
    require(typed.show_examples >= 0, "show_examples must be >= 0", "e.g. show_examples=3")
    validate_device(typed.device, "device")
    check_choice(typed.dtype, DTYPES, "dtype")
    validate_output_file(typed.out, "out")
    for name in ("split", "dataset"):
        only_with(typed, name, typed.task == "val_loss", "task=val_loss")
    only_with(typed, "batch_size", typed.task in ("val_loss", "lm_eval"), "task=val_loss or task=lm_eval")
    only_with(typed, "show_examples", typed.task == "hellaswag", "task=hellaswag")
    for name in ("tasks", "num_fewshot", "include_path", "bootstrap_iters"):
        only_with(typed.lm_eval, name, typed.task == "lm_eval", "task=lm_eval", "lm_eval.")
    require(
        typed.suite is None or typed.task == "lm_eval", "suite= has no effect without task=lm_eval", "set task=lm_eval"
    )
    if typed.task == "lm_eval":
        require(
            bool(typed.lm_eval.tasks) or typed.suite is not None,
            "task=lm_eval needs tasks or a suite",
            "e.g. lm_eval.tasks=[hellaswag,arc_easy,piqa] or suite=core_small",
        )
        validate_include_path(typed.lm_eval.include_path, "lm_eval.include_path")
        if not typed.lm_eval.tasks:  # a suite alone, which has its own of these
            needs = "lm_eval.tasks (a suite has suite.limit, suite.include_path and each task's num_fewshot)"
            only_with(typed, "limit", False, needs)
            only_with(typed.lm_eval, "num_fewshot", False, needs, "lm_eval.")
            only_with(typed.lm_eval, "include_path", False, needs, "lm_eval.")
        if typed.suite is not None:
            validate_include_path(typed.suite.include_path, "suite.include_path")
    return typed


def export_config(cfg: DictConfig) -> ExportConfig:
    typed = to_dataclass(cfg, ExportConfig)
    require(bool(typed.out.strip()), "out= is empty", "name the directory to export to, e.g. out=exported/")
    return typed


def report_config(cfg: DictConfig) -> ReportConfig:
    typed = to_dataclass(cfg, ReportConfig)
    require(Path(typed.run).is_dir(), f"run={typed.run} is not a directory", "give a run or sweep directory")
    require(
        1 <= typed.sample_tokens <= MAX_NEW_TOKENS,
        f"sample_tokens must be in [1, {MAX_NEW_TOKENS:,}], got {typed.sample_tokens}",
        "e.g. sample_tokens=100",
    )
    return typed


def plot_config(cfg: DictConfig) -> PlotConfig:
    typed = to_dataclass(cfg, PlotConfig)
    require(
        (typed.run is None) != (typed.sweep is None),
        "give exactly one of run=<run dir> and sweep=<multirun dir>",
        "e.g. run=outputs/<date>/<time>",
    )
    return typed


store = ConfigStore.instance()
for group, schema in (
    ("data", DataConfig),
    ("system", SystemConfig),
    ("paths", PathsConfig),
    ("hellaswag", HellaswagConfig),
    ("suite", SuiteConfig),
):
    store.store(group=f"schema/{group}", name="default", node=schema)
for script, schema in (
    ("sample", SampleConfig),
    ("prepare", PrepareConfig),
    ("peek", PeekConfig),
    ("train_tokenizer", TrainTokenizerConfig),
    ("bench_prepare", BenchPrepareConfig),
    ("eval", EvalConfig),
    ("export", ExportConfig),
    ("plot", PlotConfig),
    ("report", ReportConfig),
):
    store.store(group="schema", name=script, node=schema)
