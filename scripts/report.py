"""Report on a run or a sweep: `python scripts/report.py run=outputs/<run>` writes <run>/report.md."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydragpt.config import report_config
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.plot import plot_run
from hydragpt.report import PLOT, is_sweep, write_run_report, write_sweep_report


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    typed = report_config(cfg)
    run = Path(typed.run)
    if is_sweep(run):
        print(write_sweep_report(run))
        return
    if typed.plot and not (run / PLOT).is_file():
        plot_run(run)
    print(write_run_report(run, typed.samples, typed.sample_tokens))


if __name__ == "__main__":
    run_cli(main)
