"""TensorBoard event files: training scalars under `train/`, evaluation scalars under `eval/`, by iter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydragpt.errors import UserError
from hydragpt.loggers import METRICS_FILE, RunInfo, read_metrics
from hydragpt.registry import option


@option("logger", "tensorboard")
class Tensorboard:
    """TensorBoard event files (needs `pip install tensorboard`)."""

    dir: str = "tensorboard"  # event-file directory, relative to the run directory

    def build(self, run: RunInfo) -> TensorboardLogger:
        return TensorboardLogger(run.dir / self.dir, run.dir, run.resumed_at)


class TensorboardLogger:
    def __init__(self, log_dir: Path, run_dir: Path, resumed_at: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as ex:
            raise UserError(
                "logger=tensorboard needs the tensorboard package", "pip install 'hydragpt[tensorboard]'"
            ) from ex
        # A resumed run redoes every step from its checkpoint's on: TensorBoard hides the interrupted
        # process's events from there, and the checkpoint's own evaluation (kept) is written again.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at)
        if resumed_at is not None and (run_dir / METRICS_FILE).is_file():
            for record in read_metrics(run_dir):
                if record["iter"] == resumed_at and "val_loss" in record:
                    self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        section = "eval" if "val_loss" in record else "train"
        for key, value in record.items():
            if key != "iter" and isinstance(value, int | float):
                self.writer.add_scalar(f"{section}/{key}", value, global_step=record["iter"])

    def close(self, failed: bool = False) -> None:
        self.writer.close()
