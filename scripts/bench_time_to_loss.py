"""Benchmark training recipes by the time they take to reach a val loss:
`python scripts/bench_time_to_loss.py runs='[experiment=tiny_cpu,experiment=speedrun_cpu]' target=1.886`."""

import hydra
from omegaconf import DictConfig

from hydragpt.bench.time_to_loss import bench_time_to_loss, bench_time_to_loss_config
from hydragpt.errors import run_cli, user_errors_exit


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_time_to_loss")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(bench_time_to_loss(bench_time_to_loss_config(cfg)))


if __name__ == "__main__":
    run_cli(main)
