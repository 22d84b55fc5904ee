"""Token shard files: a 32-byte header (magic, format version, bytes per token, token count), then the tokens.

The header lets a reader tell a finished shard from a truncated one, and a hydragpt shard from any other
file, before a single token is trusted. Shards are filled under a `.partial` name and renamed once
complete, so a finished-looking shard is always whole.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from hydragpt.errors import UserError

MAGIC = b"HGPTTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, padding to 32 bytes
PARTIAL_SUFFIX = ".partial"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def _redo(dataset_dir: Path) -> str:
    return f"re-run `python scripts/prepare.py data={dataset_dir.name} overwrite=true`"


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(token dtype, token count) of a shard, after checking that the file is one and is whole."""
    redo = _redo(path.parent)
    if not path.is_file():
        raise UserError(f"shard {path} is missing", redo)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise UserError(f"{path} is not a hydragpt token shard (bad magic)", redo)
    _, version, itemsize, n_tokens = HEADER.unpack(head)
    if version != VERSION:
        raise UserError(f"{path} has shard format version {version}; this hydragpt reads version {VERSION}", redo)
    if itemsize not in (2, 4):
        raise UserError(f"{path} declares {itemsize} bytes per token; only 2 and 4 exist", redo)
    expected = HEADER.size + n_tokens * itemsize
    if size != expected:
        raise UserError(f"{path} is truncated or padded: {size:,} bytes, its header says {expected:,}", redo)
    return np.dtype(f"<u{itemsize}"), n_tokens


def open_shard(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    """The shard's tokens, memory-mapped read-only, after checking them against the dataset's meta.json."""
    found_dtype, found_tokens = read_header(path)
    redo = _redo(path.parent)
    if found_dtype != dtype:
        raise UserError(f"{path} stores {found_dtype.name} tokens but meta.json says {dtype.name}", redo)
    if found_tokens != n_tokens:
        raise UserError(f"{path} holds {found_tokens:,} tokens but meta.json says {n_tokens:,}", redo)
    if n_tokens == 0:  # an empty file region cannot be memory-mapped
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,))


class ShardWriter:
    """Writes one split's token stream as shards of exactly `shard_tokens` tokens (the last may be shorter).

    The shard being filled lives in `<name>.partial`; `state()` (finished shards, tokens in the partial
    one) plus `restore` let an interrupted preparation continue where it stopped.
    """

    def __init__(self, dataset_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.dir = dataset_dir
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shard_sizes: list[int] = []  # tokens in each finished shard
        self.partial_tokens = 0
        self._file = None

    @property
    def _partial_path(self) -> Path:
        return self.dir / (shard_name(self.split, len(self.shard_sizes)) + PARTIAL_SUFFIX)

    def restore(self, finished: int, partial_tokens: int) -> None:
        """Continue after `finished` complete shards and `partial_tokens` tokens of the next one."""
        self.shard_sizes = [read_header(self.dir / shard_name(self.split, i))[1] for i in range(finished)]
        self.partial_tokens = partial_tokens
        if partial_tokens:
            partial = self._partial_path
            if not partial.exists():  # the shard was finished after the progress was recorded: reopen it
                os.replace(partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX)), partial)
            self._file = open(partial, "r+b")  # noqa: SIM115 -- kept open while the shard fills
            self._file.truncate(HEADER.size + partial_tokens * self.dtype.itemsize)
            self._file.seek(0, os.SEEK_END)

    def write(self, tokens: np.ndarray) -> int:
        """Append tokens; returns how many shards this completed."""
        completed = 0
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                self._file = open(self._partial_path, "wb")  # noqa: SIM115 -- kept open while the shard fills
                self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))
            take = min(len(tokens), self.shard_tokens - self.partial_tokens)
            self._file.write(tokens[:take].tobytes())
            self.partial_tokens += take
            tokens = tokens[take:]
            if self.partial_tokens == self.shard_tokens:
                self._finish_shard()
                completed += 1
        return completed

    def flush(self) -> None:
        """Make the partial shard durable up to now, before progress that counts on it is recorded."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Finish the last, possibly shorter, shard."""
        if self._file is not None:
            self._finish_shard()

    def state(self) -> dict[str, int]:
        return {"finished": len(self.shard_sizes), "partial_tokens": self.partial_tokens}

    @property
    def files(self) -> list[str]:
        return [shard_name(self.split, i) for i in range(len(self.shard_sizes))]

    def _finish_shard(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.partial_tokens))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        partial = self._partial_path
        os.replace(partial, partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX)))
        self.shard_sizes.append(self.partial_tokens)
        self.partial_tokens = 0
