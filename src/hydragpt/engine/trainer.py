"""The Trainer: composes model, data, optimizer and schedule, checkpoints and loggers, and owns the loop.

Everything that must survive a restart (weights, optimizer, scheduler, grad scaler, step, tokens seen,
best val loss, RNG states, loader position) goes through `state_dict` / `load_state_dict`, so resuming is
exact by construction: the resumed run draws the same batches and the same dropout masks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from hydragpt.config import GPTConfig, TrainConfig, grad_accum_steps
from hydragpt.data.dataset import SPLITS, TokenDataset
from hydragpt.data.loader import SequentialBatchLoader, build_train_loader, evaluation_batches
from hydragpt.engine.checkpoint import (
    CHECKPOINT_DIR,
    clean_state_dict,
    keep_step_checkpoint,
    link_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hydragpt.engine.distributed import DistEnv, all_reduce, barrier, gather_objects
from hydragpt.engine.fsdp import (
    full_model_state,
    full_optimizer_state,
    full_tensor,
    load_full_optimizer_state,
    set_gradient_sync,
    shard_model,
)
from hydragpt.engine.metrics import mfu, peak_flops
from hydragpt.engine.optim import build_optimizer, build_scheduler, lr_factor
from hydragpt.engine.preemption import StopSignals
from hydragpt.engine.system import autocast, resolve_device, resolve_dtype, seed_everything
from hydragpt.errors import UserError
from hydragpt.evaluation import hellaswag_scores, load_hellaswag
from hydragpt.hf import is_pretrained, load_pretrained
from hydragpt.loggers import MetricsLogger, build_loggers, close_loggers, run_info, trim_metrics
from hydragpt.model import GPT
from hydragpt.plot import plot_run

log = logging.getLogger("hydragpt.train")


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being a finite number; the last checkpoint on disk is from before."""


DIVERGED_FIX = (
    "lower optim.lr, raise lr.warmup_iters or set train.grad_clip, then resume=<run dir> from the last checkpoint,"
    " which is from before this; train.skip_nonfinite=K skips up to K such steps"
)


class StepResult(NamedTuple):
    loss: float  # mean over the micro-batches and the ranks
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    skipped: bool  # nan/inf loss or gradient norm: the weights were left alone (train.skip_nonfinite)
    stop: bool  # some rank caught a stop signal: every rank stops after this step


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        run_config: dict[str, Any],
        config_choices: dict[str, str],
        resume_from: dict[str, Any] | None = None,
        env: DistEnv | None = None,
        stop: StopSignals | None = None,
    ) -> None:
        """`run_config` is the resolved config as plain data and `config_choices` the option picked in
        each config group (model: tiny_cpu, ...), both stored in every checkpoint; `resume_from` is a
        loaded checkpoint of this same run to continue from; `env` is this process's place in a
        torchrun job (rank 0 of 1 by default); `stop` is the caller's installed stop-signal handler, read
        at every step (none by default)."""
        self.cfg = cfg
        self.env = env or DistEnv()
        self.run_dir = run_dir
        self.config_choices = config_choices
        self.ckpt_dir = run_dir / CHECKPOINT_DIR
        t = cfg.train

        self.device = resolve_device(cfg.system.device, self.env.local_rank if self.env.is_distributed else None)
        self.dtype = resolve_dtype(cfg.system.dtype, self.device)
        torch.set_float32_matmul_precision(cfg.system.matmul_precision)
        seed_everything(cfg.system.seed)

        self.data = TokenDataset(Path(cfg.paths.data_dir) / cfg.data.name)
        init_ckpt = resume_from
        if init_ckpt is None and t.init_from != "scratch":
            init_ckpt = load_pretrained(t.init_from) if is_pretrained(t.init_from) else load_checkpoint(t.init_from)
        self.model_config = self._model_config(init_ckpt, resumed=resume_from is not None)
        self.data.require_block(self.model_config.block_size)
        self.run_config = {**run_config, "model": asdict(self.model_config)}  # the shape actually built

        self.raw_model = GPT(self.model_config) if init_ckpt is None else self._model_from_checkpoint(init_ckpt)
        self.raw_model.to(self.device)
        self.sharded = cfg.ddp.name == "fsdp" and self.env.is_distributed
        if self.sharded:  # before the optimizer is built: it keeps each rank's shards only
            if self.dtype == torch.float16:
                raise UserError("ddp=fsdp does not support float16", "use system.dtype=bfloat16 or float32")
            shard_model(self.raw_model, cfg.ddp.reshard_after_forward, self.dtype)
        if self.env.rank:  # the same initial weights everywhere, different dropout masks per rank
            torch.manual_seed(cfg.system.seed + self.env.rank)

        self.grad_accum = grad_accum_steps(t, self.model_config.block_size, self.env.world_size)
        self.tokens_per_step = t.batch_size * self.model_config.block_size * self.grad_accum * self.env.world_size
        self.train_loader = build_train_loader(
            cfg.data.sampling,
            self.data.splits["train"],
            t.batch_size,
            self.model_config.block_size,
            cfg.system.seed,
            self.device,
            self.env.rank,
            self.env.world_size,
        )
        self.max_iters = self._training_length()
        decay_iters = self.max_iters if cfg.lr.decay_iters is None else cfg.lr.decay_iters
        self.lr_config = replace(cfg.lr, decay_iters=decay_iters)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.lr_config, cfg.optim.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0
        self.best_val_loss = math.inf
        self.nonfinite_steps = 0  # steps skipped for a nan/inf loss or gradient norm (train.skip_nonfinite)
        self.saved: tuple[int, Path] | None = None  # the step and file of the newest checkpoint written
        self.stop = stop or StopSignals([])
        self.stopped_by: str | None = None  # why training stopped early, when it did
        self.run_id = secrets.token_hex(8)  # names this run in trackers (wandb's run id), kept on resume
        self.resumed = resume_from is not None
        if self.resumed:
            self.load_state_dict(resume_from)

        self.model: torch.nn.Module = torch.compile(self.raw_model) if cfg.system.compile else self.raw_model
        self.eval_model = self.model  # evaluation needs no gradient averaging
        if self.env.is_distributed and cfg.ddp.name == "ddp":  # averages gradients over ranks during backward
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.peak_flops = peak_flops(self.device, self.dtype, cfg.system.peak_flops)
        self.hellaswag: list[dict[str, Any]] = []  # examples scored at evaluations, when asked for
        if t.hellaswag_interval:
            self.hellaswag = load_hellaswag(cfg.hellaswag, self.env)[: t.hellaswag_examples]
        self.flops_per_token = self.raw_model.flops_per_token()

    def unwrap(self) -> None:
        """Drop the DDP wrapper before the process group is destroyed (see distributed.shutdown)."""
        self.model = self.eval_model

    def _model_config(self, init_ckpt: dict[str, Any] | None, resumed: bool) -> GPTConfig:
        """The model's shape: from the config (vocab from the data), or from the checkpoint we start from."""
        wanted = self.cfg.model
        data_vocab = self.data.tokenizer.vocab_size
        if init_ckpt is None:
            if wanted.vocab_size is None:
                return replace(wanted, vocab_size=data_vocab)
            if wanted.vocab_size < data_vocab:
                raise UserError(
                    f"model.vocab_size={wanted.vocab_size} is smaller than the dataset's vocabulary ({data_vocab})",
                    "use model.vocab_size=null to take it from the data",
                )
            return wanted
        if init_ckpt["tokenizer"] != self.data.meta.tokenizer:
            raise UserError(
                f"the checkpoint's vocabulary does not match dataset '{self.cfg.data.name}'",
                "train on the data the checkpoint was trained on, or start from scratch",
            )
        saved = GPTConfig(**init_ckpt["model_config"])
        if resumed:
            return replace(saved, dropout=wanted.dropout)
        # a new run from saved weights: the checkpoint decides the shape; only dropout comes from the
        # config, and train.crop_block_size may shorten the context
        crop = self.cfg.train.crop_block_size
        if crop is None:
            return replace(saved, dropout=wanted.dropout)
        if crop > saved.block_size:
            raise UserError(
                f"train.crop_block_size={crop} is larger than the checkpoint's block_size {saved.block_size}",
                "learned positions cannot grow: use a value up to the checkpoint's, or null",
            )
        log.info("cropping block_size from %d to %d", saved.block_size, crop)
        return replace(saved, dropout=wanted.dropout, block_size=crop)

    def _training_length(self) -> int:
        """Optimizer steps of the whole run: `train.max_iters`, or as many as `max_tokens` or `epochs` take."""
        t = self.cfg.train
        if t.epochs is not None:
            loader = self.train_loader
            assert isinstance(loader, SequentialBatchLoader)  # config validation: epochs need sequential sampling
            windows_per_step = t.batch_size * self.grad_accum * loader.world_size
            return math.ceil(t.epochs * loader.n_windows / windows_per_step)
        if t.max_tokens is not None:
            return math.ceil(t.max_tokens / self.tokens_per_step)
        return t.max_iters

    def _model_from_checkpoint(self, ckpt: dict[str, Any]) -> GPT:
        """Build at the saved size, load the weights, then crop the context if this run wants it shorter."""
        model = GPT(replace(self.model_config, block_size=ckpt["model_config"]["block_size"]))
        model.load_state_dict(ckpt["model"])
        if self.model_config.block_size < model.config.block_size:
            model.crop_block_size(self.model_config.block_size)
        return model

    # --- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank: gathering RNG states (and FSDP's shards) takes them all; rank 0 saves it."""
        if self.sharded:
            model, optimizer = full_model_state(self.raw_model), full_optimizer_state(self.raw_model, self.optimizer)
        else:
            model, optimizer = self.raw_model.state_dict(), self.optimizer.state_dict()
        return {
            "model": clean_state_dict(model),
            "model_config": asdict(self.model_config),
            "tokenizer": self.data.meta.tokenizer,
            "config": self.run_config,
            "config_choices": self.config_choices,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "tokens_per_step": self.tokens_per_step,
            "best_val_loss": self.best_val_loss,
            "nonfinite_steps": self.nonfinite_steps,
            "run_id": self.run_id,
            "rng": gather_objects(rng_state()),  # one per rank
            "loader": self.train_loader.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; optimizer hyperparameters and the lr follow the (possibly overridden)
        config from here on."""
        if self.sharded:
            load_full_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the saved run did not use float16
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.best_val_loss = state["best_val_loss"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)  # older checkpoints have none
        self.run_id = state.get("run_id", self.run_id)  # older checkpoints have none
        self.train_loader.load_state_dict(state["loader"])
        saved_tokens = state.get("tokens_per_step", self.tokens_per_step)
        if saved_tokens != self.tokens_per_step:
            log.warning(
                "tokens per step change from %s to %s on resume (world size or accumulation changed); "
                "set train.total_batch_size to keep the global batch whatever the number of ranks",
                f"{saved_tokens:,}",
                f"{self.tokens_per_step:,}",
            )
        per_rank = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older: one dict
        if self.env.rank < len(per_rank):
            set_rng_state(per_rank[self.env.rank])
        else:  # resumed on more ranks than saved: the new ranks start fresh, seeded apart
            seed_everything(self.cfg.system.seed + self.env.rank + self.step)
        optim = self.cfg.optim
        self.scheduler.base_lrs = [optim.lr for _ in self.optimizer.param_groups]
        for group, weight_decay in zip(self.optimizer.param_groups, (optim.weight_decay, 0.0), strict=True):
            group.update(
                lr=optim.lr * lr_factor(self.step, self.lr_config, optim.lr),
                betas=(optim.beta1, optim.beta2),
                eps=optim.eps,
                weight_decay=weight_decay,
            )

    # --- the loop ----------------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches.

        Before the weights change, one all-reduce tells every rank the mean loss, whether any rank saw a
        nan/inf loss or gradient norm, and whether any rank caught a stop signal: all ranks then step, skip
        or stop together, and a diverged update never reaches the weights (nor, so, a checkpoint). It costs
        one device sync per step.
        """
        lr = self.optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            with self._gradient_sync(micro_step == self.grad_accum - 1):
                with autocast(self.device, self.dtype):
                    _, loss = self.model(x, y)
                loss = loss / self.grad_accum  # the gradient of the mean over micro-batches
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip or math.inf  # 0 disables clipping; the norm is still measured
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip))
        stopping = torch.tensor(float(self.stop.received is not None), device=self.device)
        shared = all_reduce(torch.stack([loss_sum, grad_norm.to(self.device, torch.float32), stopping]), "sum")
        loss_total, norm_total, stops = shared.tolist()
        mean_loss, norm = loss_total / self.env.world_size, norm_total / self.env.world_size
        # float16's grad scaler expects an occasional inf gradient: it skips that step and lowers its scale
        skipped = not (math.isfinite(mean_loss) and (math.isfinite(norm) or self.scaler.is_enabled()))
        if skipped:
            self._skip_nonfinite("loss" if not math.isfinite(mean_loss) else "gradient norm", mean_loss, norm)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return StepResult(mean_loss, norm, lr, skipped, stop=stops > 0)

    def _skip_nonfinite(self, what: str, loss: float, norm: float) -> None:
        """Leave the weights as they are for this step, or stop the run when no more skips are allowed."""
        value = loss if what == "loss" else norm
        self.nonfinite_steps += 1
        allowed = self.cfg.train.skip_nonfinite
        if self.nonfinite_steps > allowed:
            raise TrainingDiverged(f"{what} became {value} at iter {self.step}", DIVERGED_FIX)
        log.warning(
            "iter %d: %s became %s; step skipped (%d of train.skip_nonfinite=%d)",
            self.step,
            what,
            value,
            self.nonfinite_steps,
            allowed,
        )

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool) -> Iterator[None]:
        """Gradients are averaged over ranks only on the last micro-step of an accumulation (one all-reduce,
        or one reduce-scatter under FSDP, per step)."""
        if self.sharded:
            set_gradient_sync(self.raw_model, sync)
            yield
        elif sync or not isinstance(self.model, DistributedDataParallel):
            yield
        else:
            with self.model.no_sync():
                yield

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of each split, the same windows at every evaluation; under
        torchrun each rank takes its share of the batches and the sums are all-reduced."""
        t, env = self.cfg.train, self.env
        self.eval_model.eval()
        losses = {}
        for split in SPLITS:
            batches = evaluation_batches(
                self.data.splits[split],
                t.batch_size,
                self.model_config.block_size,
                t.eval_iters,
                self.device,
                env.rank,
                env.world_size,
            )
            total = torch.zeros((), device=self.device)
            for x, y, counts in batches:
                with autocast(self.device, self.dtype):
                    _, loss = self.eval_model(x, y)
                if counts:
                    total += loss.float()
            losses[f"{split}_loss"] = (all_reduce(total, "sum") / t.eval_iters).item()
        if self.hellaswag and (self.step % t.hellaswag_interval == 0 or self.step == self.max_iters):
            with autocast(self.device, self.dtype):
                scores, _ = hellaswag_scores(self.eval_model, self.data.tokenizer, self.hellaswag, env, progress=False)
            losses.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"])
        self.eval_model.train()
        return losses

    def fit(self) -> float:
        """Train to the run's last step (or only evaluate, with `eval_only`); returns the best val loss.

        A stop signal ends training early at a step boundary, with a checkpoint; `stopped_by` says so.
        """
        t = self.cfg.train
        if self.resumed and self.env.is_main:
            trim_metrics(self.run_dir, self.step)  # what came after the checkpoint will be redone
        self.loggers: list[MetricsLogger] = []
        if self.env.is_main:
            run = run_info(
                self.run_dir,
                Path(self.cfg.paths.output_dir),
                self.run_config,
                self.run_id,
                self.step if self.resumed else None,
            )
            self.loggers = build_loggers(self.cfg.logger, run)
        self._log_setup()
        self.start_time = time.perf_counter()
        failed = True
        try:
            if t.eval_only or self.step == 0:
                self._evaluate_and_checkpoint(save=False)
            if not t.eval_only:
                self._train_loop()
            failed = False
        finally:
            close_loggers(self.loggers, failed)  # a tracker's run ends here, also when training fails
        if not t.eval_only and self.cfg.logger.plot and self.env.is_main and self.stopped_by is None:
            log.info("plots: %s", plot_run(self.run_dir))
        return self.best_val_loss

    def _train_loop(self) -> None:
        t = self.cfg.train
        first_step = self.step
        window_start, window_steps, train_seconds = time.perf_counter(), 0, 0.0
        while self.step < self.max_iters:
            result = self.train_step()
            window_steps += 1
            finished = self.step == self.max_iters
            if ((self.step - 1) % t.log_interval == 0 or finished) and not result.skipped:  # warned instead
                elapsed = time.perf_counter() - window_start
                train_seconds += elapsed
                tokens_per_sec = window_steps * self.tokens_per_step / elapsed
                self._log(
                    {
                        "iter": self.step - 1,
                        "loss": result.loss,
                        "lr": result.lr,
                        "grad_norm": result.grad_norm,
                        "tokens_per_sec": tokens_per_sec,
                        "mfu": mfu(self.flops_per_token, tokens_per_sec / self.env.world_size, self.peak_flops),
                        "tokens_seen": self.tokens_seen,
                        "time": time.perf_counter() - self.start_time,
                        "dt_ms": 1000 * elapsed / window_steps,
                    }
                )
                window_start, window_steps = time.perf_counter(), 0
            if self.step % t.eval_interval == 0 or finished:
                train_seconds += time.perf_counter() - window_start
                self._evaluate_and_checkpoint(save=True)
                window_start, window_steps = time.perf_counter(), 0
            if result.stop and not finished:
                self._stop_with_checkpoint()
                return
        steps = self.step - first_step
        if steps:
            log.info(
                "done: %d iters in %.1fs (%.1fs training, %s tok/s), best val loss %.4f, checkpoints in %s",
                steps,
                time.perf_counter() - self.start_time,
                train_seconds,
                f"{steps * self.tokens_per_step / train_seconds:,.0f}",
                self.best_val_loss,
                self.ckpt_dir,
            )

    def _stop_with_checkpoint(self) -> None:
        """A stop signal reached some rank: save this step (unless its evaluation just did) and stop.

        The barrier keeps every rank alive until rank 0's file is on disk: torchrun tears a job down, and
        SIGKILLs what is left after its timeout, as soon as one worker exits.
        """
        self.stopped_by = self.stop.received or "a stop signal to another rank"
        if self.saved is None or self.saved[0] != self.step:
            self._save(self.ckpt_dir / "last.pt", improved=False)
        barrier()
        assert self.saved is not None
        log.warning(
            "stopped by %s after iter %d of %d; %s holds this step: continue with `python scripts/train.py resume=%s`",
            self.stopped_by,
            self.step - 1,
            self.max_iters,
            self.saved[1],
            self.run_dir,
        )

    def _evaluate_and_checkpoint(self, save: bool) -> None:
        losses = self.evaluate()
        self._log({"iter": self.step, **losses, "time": time.perf_counter() - self.start_time})
        val_loss = losses["val_loss"]
        if not math.isfinite(val_loss):
            raise TrainingDiverged(f"val loss became {val_loss} at iter {self.step}", DIVERGED_FIX)
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        if not save:
            return
        if self.cfg.train.always_save_checkpoint or self.step == self.max_iters:
            self._save(self.ckpt_dir / "last.pt", improved)
        elif improved:
            self._save(self.ckpt_dir / "best.pt", improved=False)

    def _save(self, path: Path, improved: bool) -> None:
        """Write this step's checkpoint to `path` (also as best.pt when `improved`), with retention.

        Called on every rank: gathering the state takes them all; rank 0 writes.
        """
        state = self.state_dict()
        self.saved = (self.step, path)
        if not self.env.is_main:
            return
        save_checkpoint(path, state)
        if improved:
            link_checkpoint(path, self.ckpt_dir / "best.pt")
        keep = self.cfg.checkpoint
        keep_step_checkpoint(path, self.step, keep.keep_last, keep.keep_every)
        log.info("saved %s%s", path, " (also best.pt)" if improved else "")

    def _log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def _log_setup(self) -> None:
        m, t = self.model_config, self.cfg.train
        log.info("run directory: %s", self.run_dir)
        log.info(
            "model %s: %.2fM parameters (%d layers, %d heads, %d wide, block %d, vocab %d, dropout %g)",
            m.name,
            self.raw_model.num_params() / 1e6,
            m.n_layer,
            m.n_head,
            m.n_embd,
            m.block_size,
            m.vocab_size,
            m.dropout,
        )
        ranks = f" x {self.env.world_size} ranks" if self.env.is_distributed else ""
        log.info(
            "data %s: %s train / %s val tokens; %s tokens per step (batch %d x block %d x accumulation %d%s)",
            self.cfg.data.name,
            f"{len(self.data.splits['train']):,}",
            f"{len(self.data.splits['val']):,}",
            f"{self.tokens_per_step:,}",
            t.batch_size,
            m.block_size,
            self.grad_accum,
            ranks,
        )
        log.info(
            "device %s, %s%s; %s from iter %d to %d",
            self.device,
            str(self.dtype).removeprefix("torch."),
            ", compiled" if self.cfg.system.compile else "",
            "evaluating only" if t.eval_only else "training",
            self.step,
            self.max_iters,
        )
