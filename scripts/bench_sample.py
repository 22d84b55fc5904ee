"""Benchmark generation, KV cache against recompute: `python scripts/bench_sample.py model=baby_char`."""

import hydra
from omegaconf import DictConfig

from hydragpt.bench.sampling import bench_sample
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.train_config import bench_sample_config


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_sample")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(bench_sample(bench_sample_config(cfg)))


if __name__ == "__main__":
    run_cli(main)
