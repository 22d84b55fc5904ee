"""Train a GPT: `python scripts/train.py experiment=shakespeare_char` (any Hydra overrides compose).

Resume a stopped run with `python scripts/train.py resume=outputs/<date>/<time>`; train on N devices with
`torchrun --nproc_per_node=N scripts/train.py ...`.
"""

import sys

import hydra
from omegaconf import DictConfig

from hydragpt.engine.distributed import rank_arguments
from hydragpt.errors import UserError, fail, run_cli, user_errors_exit
from hydragpt.train import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    try:
        sys.argv += rank_arguments(sys.argv)  # only rank 0 of a torchrun job creates the run directory
    except UserError as error:
        fail(error)
    run_cli(main)
