"""The Trainer: runs the loop over parts that engine/builder.py composed from the config.

It knows no particular optimizer, schedule or parallelism: it steps every optimizer it was given, sets
each parameter group's lr to the schedule's multiple of its initial lr, and calls the parallelism option
for gradient synchronisation. Between log steps the host never waits for the device: each step's loss,
gradient norm, nan/inf flag and stop flag stay on the device and are read together every `log_interval`
steps (and before every evaluation and checkpoint). A nan/inf step is skipped on the device, so it never
reaches the weights, and a stop signal ends the run within `log_interval` steps with a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hydragpt.data.loader import Prefetcher
from hydragpt.engine.checkpointer import Checkpointer, TrainState
from hydragpt.engine.distributed import DistEnv, all_reduce, barrier
from hydragpt.engine.evaluators import Evaluator
from hydragpt.engine.metrics import mfu
from hydragpt.engine.optim import step_if_finite
from hydragpt.engine.parallel import SingleProcess
from hydragpt.engine.preemption import StopSignals
from hydragpt.engine.schedule import set_lr
from hydragpt.engine.system import autocast
from hydragpt.errors import UserError
from hydragpt.loggers import MetricsLogger, close_loggers
from hydragpt.model import GPT
from hydragpt.plot import plot_run
from hydragpt.report import write_run_report

log = logging.getLogger("hydragpt.train")


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being a finite number; the last checkpoint on disk is from before."""


@dataclass
class Loop:
    """The loop's settings, from `train.*`."""

    max_iters: int
    grad_accum: int
    grad_clip: float
    eval_interval: int
    log_interval: int
    skip_nonfinite: int
    eval_only: bool
    plot: bool
    report: bool
    masked_loss: bool  # chat data: the loss is the mean over the step's targets on all ranks (-1s left out)


class Trainer:
    def __init__(
        self,
        loop: Loop,
        model: GPT,
        train_model: nn.Module,
        eval_model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        schedule: Callable[[int], float],
        scaler: torch.amp.GradScaler,
        batches: Prefetcher,
        parallel: SingleProcess,
        checkpointer: Checkpointer,
        evaluators: list[Evaluator],
        open_loggers: Callable[[TrainState], list[MetricsLogger]],
        state: TrainState,
        device: torch.device,
        dtype: torch.dtype,
        env: DistEnv,
        run_dir: Path,
        flops_per_token: float,
        peak_flops: float | None,
        stop: StopSignals,
    ) -> None:
        """`model` is the bare model (gradients, checkpoints), `train_model` what training runs through
        (compiled, DDP-wrapped), `eval_model` what evaluation runs through (compiled); `schedule(step)` is
        the lr multiplier; `open_loggers` starts the loggers when training starts."""
        self.loop, self.model, self.train_model, self.eval_model = loop, model, train_model, eval_model
        self.optimizers, self.schedule, self.scaler = optimizers, schedule, scaler
        self.batches, self.parallel, self.checkpointer = batches, parallel, checkpointer
        self.evaluators, self.open_loggers, self.state = evaluators, open_loggers, state
        self.device, self.dtype, self.env, self.run_dir = device, dtype, env, run_dir
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.stop = stop
        self.stopped_by: str | None = None  # why training stopped early, when it did
        self.loggers: list[MetricsLogger] = []
        self._pending: list[torch.Tensor] = []  # per step since the last read: loss, grad norm, nan/inf, stop
        self._pending_lr: list[float] = []  # and the (first group's) lr it used
        set_lr(self.optimizers, self.schedule(self.state.step))

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def best_val_loss(self) -> float:
        return self.state.best_val_loss

    def unwrap(self) -> None:
        """Drop the DDP wrapper before the process group is destroyed (see distributed.shutdown)."""
        self.train_model = self.eval_model

    # --- one step ----------------------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step over `grad_accum` micro-batches, without waiting for the device.

        One all-reduce gives every rank the summed loss, gradient norm and stop flags, so all ranks agree on
        whether the step is finite (and skip it on the device when not) and, when read, on stopping.
        """
        accum = self.loop.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        micro_batches, weight = None, None
        if self.loop.masked_loss:  # each micro-batch's summed loss, weighted by world size / all ranks' targets
            micro_batches = [self.batches.next_batch() for _ in range(accum)]
            targets = all_reduce(sum((y >= 0).sum() for _, y in micro_batches).float(), "sum")
            weight = self.env.world_size / targets.clamp(min=1)  # ranks' gradients are averaged after
        for micro_step in range(accum):
            x, y = micro_batches[micro_step] if micro_batches else self.batches.next_batch()
            last = micro_step == accum - 1
            with contextlib.nullcontext() if last else self.parallel.accumulating(self.train_model):
                with autocast(self.device, self.dtype):
                    if weight is None:
                        _, loss = self.train_model(x, y)
                        loss = loss / accum  # the gradient of the mean over micro-batches
                    else:
                        _, loss = self.train_model(x, y, reduction="sum")
                        loss = loss * weight
                self.batches.prefetch()  # the host draws the next batch while the device works
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        clip = self.loop.grad_clip or math.inf  # 0 disables clipping; the norm is still measured
        grad_norm = self.parallel.full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        stopping = torch.full((), float(self.stop.received is not None), device=self.device)  # no host-to-device copy
        shared = all_reduce(torch.stack([loss_sum, grad_norm.to(self.device, torch.float32), stopping]), "sum")
        loss_mean, norm = shared[0] / self.env.world_size, shared[1] / self.env.world_size
        # float16's grad scaler expects an occasional inf gradient: it skips that step and lowers its scale
        norm_ok = torch.isfinite(norm) | self.scaler.is_enabled()
        nonfinite = (~(torch.isfinite(loss_mean) & norm_ok)).float()
        if not self.scaler.is_enabled():
            for optimizer in self.optimizers:
                step_if_finite(optimizer, nonfinite)
        elif not nonfinite.item():  # the scaler reads its own inf flags on the host anyway
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self._pending.append(torch.stack([loss_mean, norm, nonfinite, shared[2]]))
        self._pending_lr.append(self.optimizers[0].param_groups[0]["lr"])
        self.state.step += 1
        self.state.tokens_seen += self.state.tokens_per_step
        set_lr(self.optimizers, self.schedule(self.state.step))

    def _read_pending(self) -> tuple[dict[str, float] | None, bool]:
        """Read the steps since the last read from the device: count (or refuse) the nan/inf ones; returns
        the newest step's numbers (None when it was skipped) and whether any rank caught a stop signal."""
        rows = torch.stack(self._pending).tolist() if self._pending else []
        lrs, first_step = self._pending_lr, self.state.step - len(rows)
        self._pending, self._pending_lr = [], []
        stop = False
        for offset, (loss, norm, nonfinite, stops) in enumerate(rows):
            stop = stop or stops > 0
            if nonfinite:
                self._skip_nonfinite(first_step + offset, loss, norm)
        if not rows or rows[-1][2]:
            return None, stop
        loss, norm, _, _ = rows[-1]
        return {"loss": loss, "lr": lrs[-1], "grad_norm": norm}, stop

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error, with a fix that names what there is to go back to: the last checkpoint, or none."""
        remedy = "lower optim.lr, raise lr.warmup_iters or set train.grad_clip"
        if any(self.checkpointer.ckpt_dir.glob("*.pt")):
            remedy += f", then resume={self.run_dir} from its last checkpoint, saved before this"
        else:
            remedy += " and start again: the run saved no checkpoint before this"
        return TrainingDiverged(what, f"{remedy}; train.skip_nonfinite=K skips up to K such steps")

    def _skip_nonfinite(self, step: int, loss: float, norm: float) -> None:
        """That step left the weights as they were; stop the run when no more skips are allowed."""
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        self.state.nonfinite_steps += 1
        allowed = self.loop.skip_nonfinite
        if self.state.nonfinite_steps > allowed:
            raise self._diverged(f"{what} became {value} at iter {step}")
        log.warning(
            "iter %d: %s became %s; step skipped (%d of train.skip_nonfinite=%d)",
            step,
            what,
            value,
            self.state.nonfinite_steps,
            allowed,
        )

    # --- the loop ----------------------------------------------------------------------------------

    def fit(self) -> float:
        """Train to the run's last step (or only evaluate, with `eval_only`); returns the best val loss.

        A stop signal ends training early at a step boundary, with a checkpoint; `stopped_by` says so.
        """
        self.loggers = self.open_loggers(self.state)
        self.start_time = time.perf_counter()
        failed = True
        try:
            if self.loop.eval_only or self.state.step == 0:
                self._evaluate(save=False)
            if not self.loop.eval_only:
                self._train_loop()
            failed = False
        finally:
            close_loggers(self.loggers, failed)  # a tracker's run ends here, also when training fails
        finished = not self.loop.eval_only and self.env.is_main and self.stopped_by is None
        if finished and self.loop.plot:
            log.info("plots: %s", plot_run(self.run_dir))
        if finished and self.loop.report:
            try:
                log.info("report: %s", write_run_report(self.run_dir, device=self.device))
            except Exception as ex:  # the run itself is done and saved: a report that fails must not fail it
                log.warning(
                    "no report.md (%s: %s); python scripts/report.py run=%s writes it",
                    type(ex).__name__,
                    ex,
                    self.run_dir,
                )
        return self.state.best_val_loss

    def _train_loop(self) -> None:
        loop, state = self.loop, self.state
        first_step, first_seconds = state.step, state.train_seconds
        window_start, window_steps = time.perf_counter(), 0
        while state.step < loop.max_iters:
            self.train_step()
            window_steps += 1
            finished = state.step == loop.max_iters
            logging_step = (state.step - 1) % loop.log_interval == 0 or finished
            evaluating = state.step % loop.eval_interval == 0 or finished
            if logging_step or evaluating:
                latest, stop = self._read_pending()
                if latest is not None and logging_step:
                    elapsed = time.perf_counter() - window_start
                    state.train_seconds += elapsed
                    self._log_step(latest, window_steps, elapsed)
                    window_start, window_steps = time.perf_counter(), 0
                if evaluating:
                    state.train_seconds += time.perf_counter() - window_start
                    self._evaluate(save=True)
                    window_start, window_steps = time.perf_counter(), 0
                if stop and not finished:
                    self._stop_with_checkpoint()
                    return
        steps, train_seconds = state.step - first_step, state.train_seconds - first_seconds
        if steps:
            log.info(
                "done: %d iters in %.1fs (%.1fs training, %s tok/s), best val loss %.4f, checkpoints in %s",
                steps,
                time.perf_counter() - self.start_time,
                train_seconds,
                f"{steps * state.tokens_per_step / train_seconds:,.0f}",
                state.best_val_loss,
                self.checkpointer.ckpt_dir,
            )

    def _log_step(self, latest: dict[str, float], steps: int, elapsed: float) -> None:
        tokens_per_sec = steps * self.state.tokens_per_step / elapsed
        record = {
            "iter": self.state.step - 1,
            **latest,
            "tokens_per_sec": tokens_per_sec,
            "mfu": mfu(self.flops_per_token, tokens_per_sec / self.env.world_size, self.peak_flops),
            "tokens_seen": self.state.tokens_seen,
            "time": time.perf_counter() - self.start_time,
            "dt_ms": 1000 * elapsed / steps,
        }
        if self.device.type == "cuda":  # the high-water mark of this rank's tensors, to size batches by
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(record)

    def _stop_with_checkpoint(self) -> None:
        """A stop signal reached some rank: save this step (unless its evaluation just did) and stop.

        The barrier keeps every rank alive until rank 0's file is on disk: torchrun tears a job down, and
        SIGKILLs what is left after its timeout, as soon as one worker exits.
        """
        self.stopped_by = self.stop.received or "a stop signal to another rank"
        self.checkpointer.save_unless_saved(self.state)
        barrier()
        assert self.checkpointer.saved is not None
        log.warning(
            "stopped by %s after iter %d of %d; %s holds this step: continue with `python scripts/train.py resume=%s`",
            self.stopped_by,
            self.state.step - 1,
            self.loop.max_iters,
            self.checkpointer.saved[1],
            self.run_dir,
        )

    @torch.no_grad()
    def _evaluate(self, save: bool) -> None:
        """Every evaluator's numbers as one record; then the checkpoint the save policy asks for."""
        final = self.state.step == self.loop.max_iters
        self.eval_model.eval()
        record: dict[str, Any] = {"iter": self.state.step}
        for evaluate in self.evaluators:
            record.update(evaluate(self.eval_model, self.state.step, final))
        self.eval_model.train()
        self._log({**record, "time": time.perf_counter() - self.start_time, "train_seconds": self.state.train_seconds})
        val_loss = record["val_loss"]
        if not math.isfinite(val_loss):
            raise self._diverged(f"val loss became {val_loss} at iter {self.state.step}")
        improved = val_loss < self.state.best_val_loss
        if improved:
            self.state.best_val_loss = val_loss
        if save:
            self.checkpointer.after_evaluation(self.state, improved, final)

    def _log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)
