"""Plot a run or a sweep: `python scripts/plot.py run=outputs/<run>` or `sweep=outputs/multirun/<date>/<time>`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydragpt.config import plot_config
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.plot import plot_run, plot_sweep


@hydra.main(version_base="1.3", config_path="../conf", config_name="plot")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    typed = plot_config(cfg)
    print(plot_run(Path(typed.run)) if typed.run is not None else plot_sweep(Path(typed.sweep)))


if __name__ == "__main__":
    run_cli(main)
