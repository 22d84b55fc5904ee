"""Evaluate a checkpoint: `python scripts/eval.py ckpt=outputs/<run> task=val_loss` (or task=hellaswag)."""

import hydra
from omegaconf import DictConfig

from hydragpt.config import eval_config
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.evaluation import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    evaluate(eval_config(cfg))


if __name__ == "__main__":
    run_cli(main)
