"""Compose a Trainer from the typed config: device, data, model, optimizers, schedule, loaders, checkpointer,
evaluators and loggers, each built by its own config node. Data flows one way: config -> parts -> Trainer.

The model's shape comes from the config (its vocabulary from the dataset), or from the checkpoint a run
starts from (`train.init_from`) or continues (`resume`): the weights decide, and only dropout (and, for a
new run, `train.crop_block_size`) comes from the config.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from hydragpt.data.chat_batches import ChatBatchLoader
from hydragpt.data.dataset import TokenDataset
from hydragpt.data.identity import data_identity, open_dataset, other_data, require_settings
from hydragpt.data.loader import BatchLoader, Prefetcher, SequentialBatchLoader, build_train_loader
from hydragpt.data.tokenizer import tokenizer_from_description, with_chat_tokens
from hydragpt.engine.batch_size import largest_micro_batch
from hydragpt.engine.checkpoint import CHECKPOINT_DIR, load_weights
from hydragpt.engine.checkpointer import Checkpointer, TrainState
from hydragpt.engine.distributed import DistEnv, broadcast_object
from hydragpt.engine.evaluators import Evaluator, HellaswagAccuracy, SplitLoss, SuiteScore, TextSamples
from hydragpt.engine.metrics import peak_flops
from hydragpt.engine.preemption import StopSignals
from hydragpt.engine.system import (
    checkpoint_activations,
    require_fits,
    resolve_device,
    resolve_dtype,
    seed_everything,
)
from hydragpt.engine.trainer import Loop, Trainer
from hydragpt.errors import UserError
from hydragpt.evaluation import load_hellaswag
from hydragpt.loggers import MetricsLogger, build_loggers, run_info, trim_metrics
from hydragpt.model import GPT, GPTConfig
from hydragpt.report import machine, record_session
from hydragpt.train_config import TrainConfig, grad_accum_steps, sequences_per_rank

log = logging.getLogger("hydragpt.train")


def build_trainer(
    cfg: TrainConfig,
    run_dir: Path,
    run_config: dict[str, Any],
    config_choices: dict[str, str],
    resume_from: dict[str, Any] | None = None,
    env: DistEnv | None = None,
    stop: StopSignals | None = None,
    pinned_model_keys: dict[str, str] | None = None,
) -> Trainer:
    """`run_config` is the resolved config as plain data and `config_choices` the option picked in each
    config group, both stored in every checkpoint; `resume_from` is a loaded checkpoint of this same run
    to continue from; `env` is this process's place in a torchrun job (rank 0 of 1 by default); `stop` is
    the caller's installed stop-signal handler (none by default); `pinned_model_keys` are the model knobs
    the command line set (each with the override that set it), which a checkpoint's shape must agree with."""
    env = env or DistEnv()
    t = cfg.train
    device = resolve_device(cfg.system.device, env.local_rank if env.is_distributed else None)
    torch.set_float32_matmul_precision(cfg.system.matmul_precision)
    seed_everything(cfg.system.seed)

    data = open_dataset(config_choices.get("data"), asdict(cfg.data), cfg.paths.data_dir, compare=resume_from is None)
    if resume_from is not None:
        require_data_trained_on(cfg, data, resume_from, config_choices.get("data"))
    start_from = resume_from
    if start_from is None and t.init_from != "scratch":
        start_from = load_weights(t.init_from)
    model_config = model_shape(cfg, data, start_from, resume_from is not None, pinned_model_keys or {})
    block_knob = "model.block_size" if start_from is None else "train.crop_block_size"  # weights fix the shape
    data.require_block(model_config.block_size, block_knob)
    micro_batch_rows = model_config.block_size * (t.batch_size if t.batch_size != "auto" else 1)
    # rank 0's choice: a CPU's measured one could differ between ranks near the threshold
    dtype = broadcast_object(resolve_dtype(cfg.system.dtype, device, matmul=(micro_batch_rows, model_config.n_embd)))
    require_fits(model_config, device)  # its full weights are built on every rank, FSDP shards them after
    model = GPT(model_config) if start_from is None else model_from_checkpoint(start_from, model_config, data)
    model.to(device)
    if cfg.system.activation_checkpointing:
        checkpoint_activations(model)
    cfg.ddp.shard(model, dtype)  # before the optimizer is built: it keeps each rank's shards only
    if env.rank:  # the same initial weights everywhere, different dropout masks per rank
        torch.manual_seed(cfg.system.seed + env.rank)

    if t.batch_size == "auto":  # a resumed run's config holds the size its first start found
        sequences = sequences_per_rank(t, model_config.block_size, env.world_size)
        t.batch_size = largest_micro_batch(model, sequences, model_config.block_size, device, dtype)
        log.info("batch_size=auto: %d sequences per micro-batch of the %d per rank and step", t.batch_size, sequences)
    grad_accum = grad_accum_steps(t, model_config.block_size, env.world_size)
    tokens_per_step = t.batch_size * model_config.block_size * grad_accum * env.world_size
    loader = train_loader(cfg, data, model_config.block_size, device, env, block_knob)
    max_iters = training_length(cfg, loader, grad_accum, tokens_per_step)
    optimizers = cfg.optim.build(model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = Prefetcher(loader)
    checkpointer = Checkpointer(
        ckpt_dir=run_dir / CHECKPOINT_DIR,
        policy=cfg.checkpoint,
        always_save=t.always_save_checkpoint,
        env=env,
        parallel=cfg.ddp,
        model=model,
        optimizers=optimizers,
        scaler=scaler,
        loader=batches,
        metadata={
            "model_config": asdict(model_config),
            "tokenizer": data.meta.tokenizer,
            "config": {  # the shape actually built, and the micro-batch that batch_size=auto found
                **run_config,
                "model": asdict(model_config),
                "train": {**run_config["train"], "batch_size": t.batch_size},
            },
            "config_choices": config_choices,
            "data": data_identity(cfg.data.name, data.meta),
        },
        seed=cfg.system.seed,
    )
    state = TrainState(tokens_per_step=tokens_per_step, run_id=secrets.token_hex(8))
    if resume_from is not None:
        state = checkpointer.load_state_dict(resume_from)
        if state.tokens_per_step != tokens_per_step:
            log.warning(
                "tokens per step change from %s to %s on resume (world size or accumulation changed); "
                "set train.total_batch_size to keep the global batch whatever the number of ranks",
                f"{state.tokens_per_step:,}",
                f"{tokens_per_step:,}",
            )
            state.tokens_per_step = tokens_per_step
        if max_iters < state.step:
            raise UserError(
                f"the run is at step {state.step}, past the {max_iters} steps this resume asks for"
                " (train.max_iters, or train.max_tokens / train.epochs)",
                f"to train further, give a longer run, e.g. train.max_iters={2 * state.step}",
            )
    if not (t.eval_only or max_iters == 0 or reaches_peak(cfg.lr, max_iters)):
        log.warning(  # applied as asked (the ramp is what the run gets), but said
            "the lr never reaches its peak in this run's %d steps: is lr.warmup_iters as long as the run?"
            " shorten it or train longer",
            max_iters,
        )

    eval_model: torch.nn.Module = torch.compile(model) if cfg.system.compile else model
    train_model = cfg.ddp.wrap(eval_model, device)  # evaluation needs no gradient averaging
    evaluators: list[Evaluator] = [
        SplitLoss(
            data,
            t.batch_size,
            model_config.block_size,
            t.eval_iters,
            device,
            dtype,
            env,
            torch.from_numpy(data.tokenizer.token_bytes()).to(device),
        )
    ]
    if t.hellaswag_interval:
        examples = load_hellaswag(cfg.hellaswag, env)[: t.hellaswag_examples]
        evaluators.append(
            HellaswagAccuracy(examples, cfg.hellaswag.method, data.tokenizer, t.hellaswag_interval, device, dtype, env)
        )
    if t.eval_suite_interval and cfg.suite is not None:
        import hydragpt.harness  # noqa: F401  (lm-eval missing is an error now, not at the first evaluation)

        evaluators.append(SuiteScore(model, cfg.suite, data.tokenizer, t.batch_size, t.eval_suite_interval, dtype))
    if t.sample_interval:
        evaluators.append(
            TextSamples(
                model,
                data.tokenizer,
                t.sample_start,
                t.sample_tokens,
                t.sample_interval,
                cfg.system.seed,
                run_dir / "samples",
                device,
                dtype,
                env,
            )
        )

    def open_loggers(train: TrainState) -> list[MetricsLogger]:
        if not env.is_main:
            return []
        if resume_from is not None:
            trim_metrics(run_dir, train.step)  # what came after the checkpoint will be redone
        resumed_at = train.step if resume_from is not None else None
        run = run_info(run_dir, Path(cfg.paths.output_dir), checkpointer.metadata["config"], train.run_id, resumed_at)
        return build_loggers(list(cfg.logger.values()), run)

    loop = Loop(
        max_iters=max_iters,
        grad_accum=grad_accum,
        grad_clip=t.grad_clip,
        eval_interval=t.eval_interval,
        log_interval=t.log_interval,
        skip_nonfinite=t.skip_nonfinite,
        eval_only=t.eval_only,
        plot=t.plot,
        report=t.report,
        masked_loss=data.chat,
    )
    trainer = Trainer(
        loop=loop,
        model=model,
        train_model=train_model,
        eval_model=eval_model,
        optimizers=optimizers,
        schedule=lambda step: cfg.lr.factor(step, max_iters),
        scaler=scaler,
        batches=batches,
        parallel=cfg.ddp,
        checkpointer=checkpointer,
        evaluators=evaluators,
        open_loggers=open_loggers,
        state=state,
        device=device,
        dtype=dtype,
        env=env,
        run_dir=run_dir,
        flops_per_token=model.flops_per_token(),
        peak_flops=peak_flops(device, dtype, cfg.system.peak_flops),
        stop=stop or StopSignals([]),
    )
    _log_setup(cfg, run_dir, model, data, loop, state, env, device, dtype)
    if env.is_main and not t.eval_only:
        record_session(
            run_dir,
            {
                "start_iter": state.step,
                "max_iters": max_iters,
                "world_size": env.world_size,
                "dtype": str(dtype).removeprefix("torch."),
                "compile": cfg.system.compile,
                "parameters": model.num_params(),
                "flops_per_token": model.flops_per_token(),
                "tokens_per_step": state.tokens_per_step,
                **machine(device),
            },
        )
    return trainer


def train_loader(
    cfg: TrainConfig, data: TokenDataset, block_size: int, device: torch.device, env: DistEnv, block_knob: str
) -> BatchLoader:
    """This rank's training batches: windows of the token stream, or a chat dataset's packed conversations."""
    if not data.chat:
        args = (data.splits["train"], cfg.train.batch_size, block_size, cfg.system.seed, device, env.rank)
        return build_train_loader(cfg.data.sampling, *args, env.world_size, block_knob)
    conversations = data.conversations("train")
    shuffle = cfg.data.sampling == "random"
    args = (conversations, cfg.train.batch_size, block_size, shuffle, cfg.system.seed, device, env.rank)
    loader = ChatBatchLoader(*args, env.world_size)
    cut = int((conversations.lengths > block_size + 1).sum())
    log.info(
        "chat data: %s training documents (conversations, or their parts) packed into %s rows of block_size + 1"
        " tokens an epoch%s",
        f"{len(conversations):,}",
        f"{loader.n_windows:,}",
        f"; {cut:,} longer than a row are cut at its end (see data.max_conversation_tokens)" if cut else "",
    )
    return loader


def reaches_peak(schedule: Any, total_steps: int) -> bool:
    """Whether the schedule's multiplier reaches 1, the peak lr, at some step of a run this long (it stops
    looking at the first that does: the end of the warmup)."""
    return any(schedule.factor(step, total_steps) >= 1 - 1e-9 for step in range(total_steps))


def model_shape(
    cfg: TrainConfig,
    data: TokenDataset,
    start_from: dict[str, Any] | None,
    resumed: bool,
    pinned: dict[str, str] | None = None,
) -> GPTConfig:
    """The model's shape: from the config (vocab from the data), or from the checkpoint we start from,
    which the knobs the command line `pinned` must then agree with (the weights cannot follow them)."""
    wanted = cfg.model
    data_vocab = data.tokenizer.vocab_size
    if start_from is None:
        if wanted.vocab_size is None:
            return replace(wanted, vocab_size=data_vocab)
        if wanted.vocab_size < data_vocab:
            raise UserError(
                f"model.vocab_size={wanted.vocab_size} is smaller than the dataset's vocabulary ({data_vocab})",
                "use model.vocab_size=null to take it from the data",
            )
        return wanted
    grows = with_chat_tokens(data.meta.tokenizer, start_from["tokenizer"])
    if start_from["tokenizer"] != data.meta.tokenizer and not grows:
        trained_on = start_from.get("config", {}).get("data", {}).get("name")
        raise UserError(
            f"train.init_from={cfg.train.init_from} was trained with another tokenizer than dataset"
            f" '{cfg.data.name}' was prepared with",
            f"train on data prepared with its tokenizer{f' (it trained on data={trained_on})' if trained_on else ''},"
            " or train.init_from=scratch",
        )
    saved = GPTConfig(**start_from["model_config"])
    for key, override in (pinned or {}).items():
        value, theirs = getattr(wanted, key), getattr(saved, key)
        if key in ("name", "dropout") or value in (None, theirs):  # vocab_size null: whatever the weights have
            continue
        crop = key == "block_size" and value < theirs
        asked = override if override.startswith("model.") else f"{override} (model.{key}={value})"
        raise UserError(
            f"{asked} differs from the weights of train.init_from={cfg.train.init_from} ({key}={theirs}):"
            " a run that starts from them has their shape",
            f"{'use train.crop_block_size to shorten the context, ' if crop else ''}drop {override}, or"
            " train.init_from=scratch for the shape you set",
        )
    if grows and saved.vocab_size is not None:  # rows for the chat tokens, a multiple of 64 (GPT-2's 50304)
        saved = replace(saved, vocab_size=max(saved.vocab_size, -(-data_vocab // 64) * 64))
    crop = cfg.train.crop_block_size
    if resumed or crop is None:
        return replace(saved, dropout=wanted.dropout)
    if crop > saved.block_size:
        raise UserError(
            f"train.crop_block_size={crop} is larger than the checkpoint's block_size {saved.block_size}",
            "learned positions cannot grow: use a value up to the checkpoint's, or null",
        )
    log.info("cropping block_size from %d to %d", saved.block_size, crop)
    return replace(saved, dropout=wanted.dropout, block_size=crop)


def require_data_trained_on(
    cfg: TrainConfig, data: TokenDataset, resume_from: dict[str, Any], data_choice: str | None
) -> None:
    """A resumed run continues on the very tokens it trained on (its loader position counts in them), then
    its saved config must describe them like any run's."""
    if difference := other_data(resume_from["data"], data.meta):
        fix = "point paths.data_dir at the data it trained on"
        if resume_from["tokenizer"] == data.meta.tokenizer:  # else its weights cannot read this data
            fix += f", or start a new run from it on this data with train.init_from={cfg.resume}"
        raise UserError(f"this run trained on other data than {data.dir} holds ({difference})", fix)
    require_settings(data.meta, data_choice, asdict(cfg.data), cfg.paths.data_dir)


def model_from_checkpoint(ckpt: dict[str, Any], config: GPTConfig, data: TokenDataset) -> GPT:
    """Build at the saved size, load the weights, then crop the context if this run wants it shorter; on
    chat data of the checkpoint's tiktoken encoding, the chat tokens get rows of their own."""
    saved = ckpt["model_config"]
    model = GPT(replace(config, block_size=saved["block_size"], vocab_size=saved["vocab_size"]))
    model.load_state_dict(ckpt["model"])
    if config.block_size < model.config.block_size:
        model.crop_block_size(config.block_size)
    if with_chat_tokens(data.meta.tokenizer, ckpt["tokenizer"]) and config.vocab_size is not None:
        known = tokenizer_from_description(ckpt["tokenizer"]).vocab_size
        model.add_tokens(known, config.vocab_size)
        log.info(
            "the chat tokens (ids %d to %d) start as the mean of the %s tokens the model knows (vocab_size %d -> %d)",
            known,
            data.tokenizer.vocab_size - 1,
            f"{known:,}",
            saved["vocab_size"],
            config.vocab_size,
        )
    return model


def training_length(cfg: TrainConfig, loader: Any, grad_accum: int, tokens_per_step: int) -> int:
    """Optimizer steps of the whole run: `train.max_iters`, or as many as `max_tokens` or `epochs` take."""
    t = cfg.train
    if t.epochs is not None:
        assert isinstance(loader, SequentialBatchLoader | ChatBatchLoader)  # validation: epochs need sequential
        windows_per_step = t.batch_size * grad_accum * loader.world_size
        return math.ceil(t.epochs * loader.n_windows / windows_per_step)
    if t.max_tokens is not None:
        return math.ceil(t.max_tokens / tokens_per_step)
    return t.max_iters


def _log_setup(
    cfg: TrainConfig,
    run_dir: Path,
    model: GPT,
    data: TokenDataset,
    loop: Loop,
    state: TrainState,
    env: DistEnv,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    m, t = model.config, cfg.train
    log.info("run directory: %s", run_dir)
    log.info(
        "model %s: %.2fM parameters (%d layers, %d heads, %d wide, block %d, vocab %d, dropout %g)",
        m.name,
        model.num_params() / 1e6,
        m.n_layer,
        m.n_head,
        m.n_embd,
        m.block_size,
        m.vocab_size,
        m.dropout,
    )
    ranks = f" x {env.world_size} ranks" if env.is_distributed else ""
    log.info(
        "data %s: %s train / %s val tokens; %s tokens per step (batch %d x block %d x accumulation %d%s)",
        cfg.data.name,
        f"{len(data.splits['train']):,}",
        f"{len(data.splits['val']):,}",
        f"{state.tokens_per_step:,}",
        t.batch_size,
        m.block_size,
        loop.grad_accum,
        ranks,
    )
    log.info(
        "device %s, %s%s; %s from iter %d to %d",
        device,
        str(dtype).removeprefix("torch."),
        ", compiled" if cfg.system.compile else "",
        "evaluating only" if t.eval_only else "training",
        state.step,
        loop.max_iters,
    )
