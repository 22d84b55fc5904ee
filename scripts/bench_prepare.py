"""Benchmark data preparation: `python scripts/bench_prepare.py size_mb=200 workers=[1,2]`."""

import hydra
from omegaconf import DictConfig

from hydragpt.bench.prepare import bench_prepare
from hydragpt.config import bench_prepare_config
from hydragpt.errors import run_cli, user_errors_exit


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_prepare")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(bench_prepare(bench_prepare_config(cfg)))


if __name__ == "__main__":
    run_cli(main)
