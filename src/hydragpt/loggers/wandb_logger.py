"""Weights & Biases: one wandb run per run directory, continued (same id) when the run is resumed.

Charts use `iter` as their x axis (`define_metric`), not wandb's own step counter, so the steps a resumed
run redoes land where they belong instead of being refused as going backwards.
"""

from __future__ import annotations

import os
from typing import Any

from hydragpt.config import WandbConfig
from hydragpt.errors import UserError
from hydragpt.loggers import RunInfo

FIX = "run `wandb login` or set WANDB_API_KEY, or log locally with logger.wandb.mode=offline"


class WandbLogger:
    def __init__(self, cfg: WandbConfig, run: RunInfo) -> None:
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
