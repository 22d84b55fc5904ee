"""TensorBoard event files: training scalars under `train/`, evaluation scalars under `eval/`, by iter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydragpt.errors import UserError


class TensorboardLogger:
    def __init__(self, log_dir: Path, resumed_at: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as ex:
            raise UserError(
                "logger=tensorboard needs the tensorboard package", "pip install 'hydragpt[tensorboard]'"
            ) from ex
        # a resumed run redoes what came after its checkpoint's evaluation: TensorBoard hides those events
        purge_step = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        section = "eval" if "val_loss" in record else "train"
        for key, value in record.items():
            if key != "iter" and isinstance(value, int | float):
                self.writer.add_scalar(f"{section}/{key}", value, global_step=record["iter"])

    def close(self, failed: bool = False) -> None:
        self.writer.close()
