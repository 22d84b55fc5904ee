"""Sample from a trained model: `python scripts/sample.py ckpt=outputs/<run>/checkpoints/last.pt start="ROMEO:"`."""

import hydra
from omegaconf import DictConfig

from hydragpt.config import sample_config
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.sampling import sample


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    sample(sample_config(cfg))


if __name__ == "__main__":
    run_cli(main)
