"""Report on a run or a sweep: `python scripts/report.py run=outputs/<run>` writes <run>/report.md."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydragpt.config import only_with, report_config
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.loggers import read_metrics
from hydragpt.plot import PLOT_FILE, plot_run
from hydragpt.report import is_sweep, write_run_report, write_sweep_report


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    typed = report_config(cfg)
    run = Path(typed.run)
    if is_sweep(run):
        for name in ("samples", "sample_tokens", "plot"):  # a sweep's report has none of these
            only_with(typed, name, False, "a run directory (run= is a sweep's)")
        print(write_sweep_report(run))
        return
    if typed.plot and read_metrics(run) and not (run / PLOT_FILE).is_file():
        plot_run(run)
    print(write_run_report(run, typed.samples, typed.sample_tokens))


if __name__ == "__main__":
    run_cli(main)
