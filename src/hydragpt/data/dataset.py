"""Prepared datasets on disk, and the loader that draws training batches from them.

A prepared dataset is a directory with `train.bin` and `val.bin` (uint16 token ids, memory-mapped once)
and `meta.json` (tokenizer description, vocab size, token counts, source).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydragpt.data.tokenizer import Tokenizer, tokenizer_from_description
from hydragpt.errors import UserError

META_FILE = "meta.json"
TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")


def split_path(dataset_dir: Path, split: str) -> Path:
    return dataset_dir / f"{split}.bin"


@dataclass
class DatasetMeta:
    tokenizer: dict[str, Any]
    vocab_size: int
    tokens: dict[str, int]
    source: str


def write_meta(dataset_dir: Path, **fields: Any) -> None:
    meta = DatasetMeta(**fields)
    tmp = dataset_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    os.replace(tmp, dataset_dir / META_FILE)


def read_meta(dataset_dir: Path) -> DatasetMeta:
    path = dataset_dir / META_FILE
    name = dataset_dir.name
    if not path.is_file():
        raise UserError(
            f"dataset '{name}' is not prepared: {path} not found",
            f"run `python scripts/prepare.py data={name}` first",
        )
    try:
        return DatasetMeta(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as ex:
        raise UserError(
            f"{path} is not a valid dataset description", f"re-run prepare.py data={name} overwrite=true"
        ) from ex


class TokenDataset:
    """The train and val token arrays of one prepared dataset, memory-mapped once and shared by loaders."""

    def __init__(self, dataset_dir: Path) -> None:
        self.dir = dataset_dir
        self.meta = read_meta(dataset_dir)
        self.tokenizer: Tokenizer = tokenizer_from_description(self.meta.tokenizer)
        self.splits = {split: self._open(split) for split in SPLITS}

    def require_block(self, block_size: int) -> None:
        """Every split must hold at least one window of block_size inputs plus the next-token target."""
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise UserError(
                    f"the {split} split of '{self.dir.name}' has {len(tokens)} tokens, fewer than one block "
                    f"(block_size + 1 = {block_size + 1})",
                    "use a smaller model.block_size or a larger corpus",
                )

    def _open(self, split: str) -> np.ndarray:
        path = split_path(self.dir, split)
        redo = f"re-run `python scripts/prepare.py data={self.dir.name} overwrite=true`"
        if not path.is_file():
            raise UserError(f"{path} is missing", redo)
        n_tokens = path.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize
        if n_tokens != self.meta.tokens.get(split):
            raise UserError(f"{path} holds {n_tokens} tokens but meta.json says {self.meta.tokens.get(split)}", redo)
        if n_tokens == 0:  # an empty file cannot be memory-mapped
            return np.empty(0, dtype=TOKEN_DTYPE)
        return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def _windows_to_batch(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets (len(starts), block_size), int64 on the device."""
    windows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device.type == "cuda":
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]


def evaluation_batches(
    tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` batches of windows spread evenly over the whole split.

    The same windows at every evaluation and in every run of the same data: val losses differ only
    because the models do, and a stratified sample is a steadier estimate than random windows.
    """
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).astype(np.int64)
    for batch_starts in starts.reshape(n_batches, batch_size):
        yield _windows_to_batch(tokens, batch_starts, block_size, device)


class RandomBatchLoader:
    """Batches of random windows of one split, as nanoGPT samples them.

    The windows come from the loader's own seeded generator, not the global RNG: its state is the
    loader's position, saved in checkpoints, so a resumed run draws exactly the batches the
    uninterrupted run would have drawn.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int, device: torch.device):
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (batch_size, block_size) int64 on the device."""
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)
        return _windows_to_batch(self.tokens, starts.numpy(), self.block_size, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
