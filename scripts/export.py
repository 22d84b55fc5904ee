"""Export to Hugging Face: `python scripts/export.py ckpt=outputs/<run> out=exported/`."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydragpt.config import export_config
from hydragpt.errors import run_cli, user_errors_exit
from hydragpt.hf import export
from hydragpt.sampling import load_source


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    typed = export_config(cfg)
    ckpt, name = load_source(typed.ckpt, None, Path(typed.paths.output_dir))
    export(ckpt, Path(typed.out))
    print(f"exported {name} to {typed.out}")


if __name__ == "__main__":
    run_cli(main)
