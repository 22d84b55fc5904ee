"""Prepared datasets on disk: `meta.json` plus each split's token shards, read as one memory-mapped array.

A prepared dataset directory holds `train_000000.bin, ...` and `val_000000.bin, ...` (see `shards.py`) and
`meta.json`: tokenizer description, vocab size, token dtype, source, and the shard list with each shard's
token count. meta.json is written last, so its presence marks a finished preparation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hydragpt.data.shards import open_shard
from hydragpt.data.tokenizer import Tokenizer, token_dtype, tokenizer_from_description
from hydragpt.errors import UserError

META_FILE = "meta.json"
META_FORMAT = 2
SPLITS = ("train", "val")


@dataclass
class DatasetMeta:
    format: int
    tokenizer: dict[str, Any]
    vocab_size: int
    dtype: str
    source: str
    documents: int
    tokens: dict[str, int]  # per split
    shards: dict[str, list[dict[str, Any]]]  # per split: [{"file": "train_000000.bin", "tokens": n}, ...]


def write_meta(dataset_dir: Path, meta: DatasetMeta) -> None:
    tmp = dataset_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    os.replace(tmp, dataset_dir / META_FILE)


def read_meta(dataset_dir: Path) -> DatasetMeta:
    path = dataset_dir / META_FILE
    name = dataset_dir.name
    redo = f"re-run `python scripts/prepare.py data={name} overwrite=true`"
    if not path.is_file():
        raise UserError(
            f"dataset '{name}' is not prepared: {path} not found",
            f"run `python scripts/prepare.py data={name}` first",
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as ex:
        raise UserError(f"{path} is not a valid dataset description", redo) from ex
    if not isinstance(raw, dict) or raw.get("format") != META_FORMAT:
        raise UserError(f"{path} was written by another version of hydragpt's prepare", redo)
    try:
        return DatasetMeta(**raw)
    except TypeError as ex:
        raise UserError(f"{path} is not a valid dataset description", redo) from ex


class SplitTokens:
    """One split's shards seen as a single token array: windows may cross from one shard into the next.

    `files` are the shards' paths, when they come from disk: every read first checks (one stat per shard
    read) that the file is still the one mapped at the start, since reading a memory-mapped file that was
    cut short kills the process with a bus error, and one deleted or replaced under a run would quietly
    feed it stale or different tokens. A change between the check and the read itself still escapes it.
    """

    def __init__(self, shards: list[np.ndarray], files: list[Path] | None = None) -> None:
        kept = [i for i, shard in enumerate(shards) if len(shard)]
        self.shards = [shards[i] for i in kept]
        self.files = [files[i] for i in kept] if files is not None else []
        self._identities = [_identity(path) for path in self.files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global offset of each shard, then the end

    def _verify(self, shard: int) -> None:
        if not self.files:
            return
        path = self.files[shard]
        fix = (
            "put the dataset back as it was (or re-prepare it the same way) and run again;"
            " resume=<run dir> continues a training run"
        )
        try:
            inode, size = _identity(path)
        except FileNotFoundError:
            raise UserError(f"{path} disappeared while in use", fix) from None
        expected_inode, expected_size = self._identities[shard]
        if size != expected_size:
            raise UserError(f"{path} changed size while in use ({expected_size:,} -> {size:,} bytes)", fix)
        if inode != expected_inode:
            raise UserError(f"{path} was replaced by another file while in use", fix)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, read across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            self._verify(shard)
            local = start - int(self.starts[shard])
            piece = self.shards[shard][local : local + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces).astype(np.int64)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64 windows; those inside one shard are gathered in one vectorised read."""
        out = np.empty((len(starts), length), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        offsets = np.arange(length)
        for shard in np.unique(shard_of):
            self._verify(int(shard))
            rows = np.flatnonzero(shard_of == shard)
            local = starts[rows] - self.starts[shard]
            inside = local + length <= len(self.shards[shard])
            out[rows[inside]] = self.shards[shard][local[inside, None] + offsets]
            for row in rows[~inside]:
                out[row] = self.read(int(starts[row]), length)
        return out


def _identity(path: Path) -> tuple[int, int]:
    """What tells a file apart from its replacement: (inode, size in bytes)."""
    stat = path.stat()
    return stat.st_ino, stat.st_size


def _allow_open_files(n_shards: int) -> None:
    """Each memory-mapped shard holds a file descriptor: raise the soft limit (often 1024) if needed."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows): nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = n_shards + 256  # and room for everything else the process opens
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UserError(
            f"the dataset has {n_shards} shards but this process may open only {hard} files",
            "raise the limit (`ulimit -n`), or prepare with a larger data.shard_tokens",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class TokenDataset:
    """The train and val splits of one prepared dataset, memory-mapped once and shared by all loaders.

    Each shard is mapped a single time for the life of the dataset (no re-opening per batch, no handle
    growth); reads copy only the windows a batch needs.
    """

    def __init__(self, dataset_dir: Path) -> None:
        self.dir = dataset_dir
        self.meta = read_meta(dataset_dir)
        self.tokenizer: Tokenizer = tokenizer_from_description(self.meta.tokenizer)
        dtype = np.dtype(self.meta.dtype)
        redo = f"re-run `python scripts/prepare.py data={dataset_dir.name} overwrite=true`"
        if self.tokenizer.vocab_size != self.meta.vocab_size or dtype != token_dtype(self.meta.vocab_size):
            raise UserError(
                f"{dataset_dir / META_FILE} is inconsistent: vocab {self.meta.vocab_size} stored as {dtype.name}, "
                f"tokenizer vocab {self.tokenizer.vocab_size}",
                redo,
            )
        _allow_open_files(sum(len(shards) for shards in self.meta.shards.values()))
        self.splits: dict[str, SplitTokens] = {}
        for split in SPLITS:
            shards = self.meta.shards.get(split, [])
            files = [dataset_dir / shard["file"] for shard in shards]
            tokens = [open_shard(path, dtype, shard["tokens"]) for path, shard in zip(files, shards, strict=True)]
            self.splits[split] = SplitTokens(tokens, files)
        for split, tokens in self.splits.items():
            head = tokens.shards[0][:4096] if tokens.shards else np.empty(0, dtype)
            if len(head) and int(head.max()) >= self.meta.vocab_size:
                raise UserError(
                    f"the {split} split of '{dataset_dir.name}' holds token id {int(head.max())}, outside its "
                    f"vocabulary of {self.meta.vocab_size}",
                    redo,
                )

    def require_block(self, block_size: int) -> None:
        """Every split must hold at least one window of block_size inputs plus the next-token target."""
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise UserError(
                    f"the {split} split of '{self.dir.name}' has {len(tokens)} tokens, fewer than one block "
                    f"(block_size + 1 = {block_size + 1})",
                    "use a smaller model.block_size or a larger corpus",
                )
