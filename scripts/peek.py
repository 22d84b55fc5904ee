"""Show what a prepared dataset holds: `python scripts/peek.py data=shakespeare_gpt2 split=val n_tokens=100`."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from hydragpt.config import peek_config
from hydragpt.data.peek import peek
from hydragpt.errors import run_cli, user_errors_exit


@hydra.main(version_base="1.3", config_path="../conf", config_name="peek")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(peek(peek_config(cfg), HydraConfig.get().runtime.choices.get("data")))


if __name__ == "__main__":
    run_cli(main)
