"""Weights & Biases: one wandb run per run directory, continued (same id) when the run is resumed.

Charts use `iter` as their x axis (`define_metric`), not wandb's own step counter, so the steps a resumed
run redoes land where they belong instead of being refused as going backwards.
"""

from __future__ import annotations

import os
from dataclasses import field
from typing import Any, ClassVar, Optional

from hydragpt.errors import UserError
from hydragpt.loggers import RunInfo
from hydragpt.registry import option

# Optional[...] rather than `X | None`: OmegaConf reads these annotations when the config is composed.
# ruff: noqa: UP045

FIX = "run `wandb login` or set WANDB_API_KEY, or log locally with logger.wandb.mode=offline"


WANDB_MODES = ("online", "offline", "disabled")


@option("logger", "wandb")
class Wandb:
    """Weights & Biases: one wandb run per run directory, written by rank 0 only."""

    remote: ClassVar[bool] = True  # may fail on the network: started after the local trackers

    project: str = "hydragpt"  # wandb project to log into
    entity: Optional[str] = None  # team or user that owns the project (null: your default entity)
    group: Optional[str] = None  # null: the sweep's name (<date>/<time>) for a multirun's jobs, none for one run
    name: Optional[str] = None  # null: the run directory's path under paths.output_dir
    tags: list[str] = field(default_factory=list)  # labels to filter runs by, e.g. [baseline,fineweb]
    notes: Optional[str] = None  # a free-text description shown on the run page
    mode: Optional[str] = None  # online | offline | disabled (null: the WANDB_MODE variable, else online)
    init_timeout: float = 90  # seconds to wait for wandb to start before failing the run (no network, bad key)

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in WANDB_MODES:
            raise UserError(f"unknown logger.wandb.mode '{self.mode}'", f"use one of: {', '.join(WANDB_MODES)}")

    def build(self, run: RunInfo) -> WandbLogger:
        return WandbLogger(self, run)


class WandbLogger:
    def __init__(self, cfg: Wandb, run: RunInfo) -> None:
        try:
            import wandb
        except ImportError as ex:
            raise UserError("logger=wandb needs the wandb package", "pip install 'hydragpt[wandb]'") from ex
        online = (cfg.mode or os.environ.get("WANDB_MODE") or "online") in ("online", "run")
        # without a key wandb would ask for one at a terminal, and wait there with the other ranks
        if online and not wandb.login(prompt=False, verify=False):
            raise UserError("logger=wandb is online but wandb has no API key", FIX)
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                group=cfg.group or run.group,
                name=cfg.name or run.name,
                tags=cfg.tags,
                notes=cfg.notes,
                mode=cfg.mode,  # None: WANDB_MODE, else online
                id=run.run_id,
                resume="allow",
                reinit="finish_previous",  # never log into a run an earlier sweep job left open
                dir=run.dir,
                config=run.config,
                settings=wandb.Settings(init_timeout=cfg.init_timeout),
            )
        except Exception as ex:  # no network, a bad key or entity: wandb's errors vary by version
            reason = next(iter(str(ex).strip().splitlines()), type(ex).__name__)
            raise UserError(f"wandb could not start a run: {reason}", FIX) from ex
        try:
            self.run.define_metric("iter")
            self.run.define_metric("*", step_metric="iter")
        except BaseException:
            self.run.finish(exit_code=1)
            raise

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(record)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
