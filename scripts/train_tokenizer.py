"""Train a byte-level BPE on a dataset's text: `python scripts/train_tokenizer.py data=<option> vocab_size=32768`,
then prepare with it: `python scripts/prepare.py data=<option> data.tokenizer=<the file it prints>`."""

import json

import hydra
from omegaconf import DictConfig

from hydragpt.config import train_tokenizer_config
from hydragpt.data.bpe import train_tokenizer
from hydragpt.errors import run_cli, user_errors_exit


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_tokenizer")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    print(json.dumps(train_tokenizer(train_tokenizer_config(cfg))), flush=True)


if __name__ == "__main__":
    run_cli(main)
