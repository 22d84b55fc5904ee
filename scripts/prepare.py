"""Prepare a dataset: `python scripts/prepare.py data=shakespeare_gpt2 [data.source=<path, URL or hf:name>]`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hydragpt.config import prepare_config
from hydragpt.data.prepare import prepare
from hydragpt.errors import run_cli, user_errors_exit


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    prepare(prepare_config(cfg), command_line=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    run_cli(main)
