"""Plot a run or a sweep: `python scripts/plot.py run=outputs/<run>` or `sweep=outputs/multirun/<date>/<time>`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydragpt.config import PlotConfig, to_dataclass
from hydragpt.errors import UserError, run_cli, user_errors_exit
from hydragpt.plot import plot_run, plot_sweep


@hydra.main(version_base="1.3", config_path="../conf", config_name="plot")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    typed = to_dataclass(cfg, PlotConfig)
    if (typed.run is None) == (typed.sweep is None):
        raise UserError("give exactly one of run=<run dir> and sweep=<multirun dir>", "e.g. run=outputs/<date>/<time>")
    print(plot_run(Path(typed.run)) if typed.run is not None else plot_sweep(Path(typed.sweep)))


if __name__ == "__main__":
    run_cli(main)
