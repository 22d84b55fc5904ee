"""Token shard files: a 32-byte header (magic, format version, bytes per token, token count), then the tokens.

The header lets a reader tell a finished shard from a truncated one, and a hydragpt shard from any other
file, before a single token is trusted. Shards are filled under a `.partial` name and renamed once
complete, so a finished-looking shard is always whole. A shard's sha256 is that of its tokens (the bytes
after the header: `tail -c +33 <shard> | sha256sum`), hashed as they are written.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hydragpt.errors import UserError

MAGIC = b"HGPTTOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, padding to 32 bytes
PARTIAL_SUFFIX = ".partial"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def read_header(path: Path, redo: Callable[[], str]) -> tuple[np.dtype, int]:
    """(token dtype, token count) of a shard, after checking that the file is one and is whole; `redo`
    gives the fix for a shard that is not (asked for only then)."""
    if not path.is_file():
        raise UserError(f"shard {path} is missing", redo())
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise UserError(f"{path} is not a hydragpt token shard (bad magic)", redo())
    _, version, itemsize, n_tokens = HEADER.unpack(head)
    if version != VERSION:
        raise UserError(f"{path} has shard format version {version}; this hydragpt reads version {VERSION}", redo())
    if itemsize not in (1, 2, 4):  # 1: a chat dataset's loss mask
        raise UserError(f"{path} declares {itemsize} bytes per token; only 1, 2 and 4 exist", redo())
    expected = HEADER.size + n_tokens * itemsize
    if size != expected:
        raise UserError(f"{path} is truncated or padded: {size:,} bytes, its header says {expected:,}", redo())
    return np.dtype(f"<u{itemsize}"), n_tokens


def open_shard(path: Path, dtype: np.dtype, n_tokens: int, redo: Callable[[], str]) -> np.ndarray:
    """The shard's tokens, memory-mapped read-only, after checking them against the dataset's meta.json."""
    found_dtype, found_tokens = read_header(path, redo)
    if found_dtype != dtype:
        raise UserError(f"{path} stores {found_dtype.name} tokens but meta.json says {dtype.name}", redo())
    if found_tokens != n_tokens:
        raise UserError(f"{path} holds {found_tokens:,} tokens but meta.json says {n_tokens:,}", redo())
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
        self.shard_sha256: list[str] = []  # and the sha256 of those tokens
        self.partial_tokens = 0
        self._file = None
        self._hash = hashlib.sha256()  # of the partial shard's tokens so far

    @property
    def _partial_path(self) -> Path:
        return self.dir / (shard_name(self.split, len(self.shard_sizes)) + PARTIAL_SUFFIX)

    def restore(self, finished: int, partial_tokens: int) -> None:
        """Continue after `finished` complete shards and `partial_tokens` tokens of the next one (their
        hashes are computed again from the files: a hash's running state cannot be saved)."""
        paths = [self.dir / shard_name(self.split, i) for i in range(finished)]
        self.shard_sizes = [read_header(path, _start_over)[1] for path in paths]
        self.shard_sha256 = [
            _tokens_hash(path, size * self.dtype.itemsize).hexdigest()
            for path, size in zip(paths, self.shard_sizes, strict=True)
        ]
        self.partial_tokens = partial_tokens
        if partial_tokens:
            partial = self._partial_path
            if not partial.exists():  # the shard was finished after the progress was recorded: reopen it
                os.replace(partial.with_name(partial.name.removesuffix(PARTIAL_SUFFIX)), partial)
            self._file = open(partial, "r+b")  # noqa: SIM115 -- kept open while the shard fills
            self._file.truncate(HEADER.size + partial_tokens * self.dtype.itemsize)
            self._hash = _tokens_hash(partial, partial_tokens * self.dtype.itemsize)
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
            data = tokens[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
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
        self.shard_sha256.append(self._hash.hexdigest())
        self.partial_tokens = 0
        self._hash = hashlib.sha256()


def _start_over() -> str:
    return "start over with overwrite=true"


def _tokens_hash(path: Path, n_bytes: int) -> hashlib._Hash:
    """sha256 of the first `n_bytes` token bytes of a shard file (after its header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(HEADER.size)
        while n_bytes > 0 and (chunk := f.read(min(n_bytes, 1 << 24))):
            digest.update(chunk)
            n_bytes -= len(chunk)
    return digest
