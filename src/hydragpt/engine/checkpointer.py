"""The Checkpointer: what goes into a run's checkpoints, when they are written and kept, and how a resumed
run takes its state back.

It holds the run's stateful parts (model, optimizers, grad scaler, train loader) and asks the parallelism
option to gather sharded ones, so a checkpoint is always one self-contained file (engine/checkpoint.py)
whatever the number of ranks. Every rank calls `save` (gathering takes them all); rank 0 writes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hydragpt.data.loader import BatchLoader
from hydragpt.engine.checkpoint import (
    clean_state_dict,
    keep_step_checkpoint,
    link_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from hydragpt.engine.distributed import DistEnv, gather_objects
from hydragpt.engine.optim import hyperparameters
from hydragpt.engine.parallel import SingleProcess
from hydragpt.engine.system import seed_everything
from hydragpt.errors import UserError
from hydragpt.model import GPT
from hydragpt.train_config import CheckpointConfig

log = logging.getLogger("hydragpt.train")


@dataclass
class TrainState:
    """The loop's own counters, saved with every checkpoint."""

    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    tokens_per_step: int = 0
    best_val_loss: float = float("inf")
    nonfinite_steps: int = 0  # steps skipped for a nan/inf loss or gradient norm (train.skip_nonfinite)
    train_seconds: float = 0.0  # wall time in training steps, without evaluations, checkpoints or start-up
    run_id: str = ""  # names this run in trackers (wandb's run id), kept on resume


@dataclass
class Checkpointer:
    ckpt_dir: Path
    policy: CheckpointConfig
    always_save: bool  # train.always_save_checkpoint
    env: DistEnv
    parallel: SingleProcess
    model: GPT
    optimizers: list[torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    loader: BatchLoader
    metadata: dict[str, Any]  # model_config, tokenizer, config, config_choices, data: what a checkpoint says it is
    seed: int
    saved: tuple[int, Path] | None = None  # the step and file of the newest checkpoint written

    def state_dict(self, train: TrainState) -> dict[str, Any]:
        """Called on every rank: gathering RNG states (and FSDP's shards) takes them all."""
        return {
            **self.metadata,
            "model": clean_state_dict(self.parallel.model_state(self.model)),
            "optimizers": [self.parallel.optimizer_state(self.model, opt) for opt in self.optimizers],
            "scaler": self.scaler.state_dict(),
            **asdict(train),
            "rng": gather_objects(rng_state()),  # one per rank
            "loader": self.loader.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> TrainState:
        """Continue from `state` (a checkpoint of this run); returns its counters. Each parameter group's
        settings (lr, betas, weight decay...) follow this run's config, which resume may have overridden."""
        if len(state["optimizers"]) != len(self.optimizers):
            raise UserError(
                f"the checkpoint has {len(state['optimizers'])} optimizer(s), this run's optim builds"
                f" {len(self.optimizers)}",
                "resume with the optim option the run was started with",
            )
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            configured = hyperparameters(optimizer)
            self.parallel.load_optimizer_state(self.model, optimizer, saved)
            for group, settings in zip(optimizer.param_groups, configured, strict=True):
                group.update(settings)
        if state["scaler"]:  # empty when the saved run did not use float16
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        train = TrainState(**{key: state[key] for key in TrainState.__dataclass_fields__})
        per_rank = state["rng"]
        if self.env.rank < len(per_rank):
            set_rng_state(per_rank[self.env.rank])
        else:  # resumed on more ranks than saved: the new ranks start fresh, seeded apart
            seed_everything(self.seed + self.env.rank + train.step)
        return train

    def save(self, name: str, train: TrainState, also_best: bool = False) -> Path:
        """Write this step's checkpoint as checkpoints/<name> (and best.pt when `also_best`), with retention."""
        path = self.ckpt_dir / name
        state = self.state_dict(train)
        self.saved = (train.step, path)
        if self.env.is_main:
            save_checkpoint(path, state)
            if also_best:
                link_checkpoint(path, self.ckpt_dir / "best.pt")
            keep_step_checkpoint(path, train.step, self.policy.keep_last, self.policy.keep_every)
            log.info("saved %s%s", path, " (also best.pt)" if also_best else "")
        return path

    def after_evaluation(self, train: TrainState, improved: bool, final: bool) -> None:
        """The save policy: last.pt at every evaluation (also best.pt when val improved), or, with
        `always_save_checkpoint=false`, best.pt when val improved and last.pt at the end."""
        if self.always_save or final:
            self.save("last.pt", train, also_best=improved)
        elif improved:
            self.save("best.pt", train)

    def save_unless_saved(self, train: TrainState) -> None:
        """last.pt at this step, unless this step's evaluation just wrote a checkpoint (a stop signal)."""
        if self.saved is None or self.saved[0] != train.step:
            self.save("last.pt", train)
