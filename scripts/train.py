"""Train a GPT: `python scripts/train.py experiment=shakespeare_char` (any Hydra overrides compose).

Resume a stopped run with `python scripts/train.py resume=outputs/<date>/<time>`.
"""

import hydra
from omegaconf import DictConfig

from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    run_cli(main)
