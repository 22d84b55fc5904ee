"""Benchmark training throughput: `python scripts/bench_train.py runs='["experiment=tiny_cpu"]' steps=50`."""

import hydra
from omegaconf import DictConfig

from hydragpt.bench.train import bench_train, bench_train_config
from hydragpt.errors import run_cli, user_errors_exit


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_train")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(bench_train(bench_train_config(cfg)))


if __name__ == "__main__":
    run_cli(main)
