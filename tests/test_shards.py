"""Shard files: the header round trip, and one-line errors for truncated, foreign and mismatched shards."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from hydragpt.data.shards import HEADER, ShardWriter, open_shard, read_header
from hydragpt.errors import UserError
from tests.helpers import open_prepared, prepare_dataset, run_script


def redo() -> str:
    return "re-run prepare.py with overwrite=true"


def test_writer_fills_fixed_size_shards_and_reader_maps_them(tmp_path: Path) -> None:
    for dtype in (np.uint16, np.uint32):
        writer = ShardWriter(tmp_path, f"d{np.dtype(dtype).itemsize}", np.dtype(dtype), shard_tokens=100)
        tokens = np.arange(250, dtype=np.int64) * (1000 if dtype == np.uint32 else 1)
        assert writer.write(tokens[:130]) == 1 and writer.write(tokens[130:]) == 1
        writer.close()
        assert writer.shard_sizes == [100, 100, 50] and not list(tmp_path.glob("*.partial"))
        shards = [
            open_shard(tmp_path / f, np.dtype(dtype), n, redo)
            for f, n in zip(writer.files, writer.shard_sizes, strict=False)
        ]
        assert np.concatenate(shards).tolist() == tokens.tolist()
        assert read_header(tmp_path / writer.files[0], redo) == (np.dtype(dtype), 100)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    source = tmp_path / "corpus.txt"
    source.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return prepare_dataset(tmp_path / "data", "shakespeare_char", source)


def corrupt_truncated(shard: Path, meta: dict) -> None:
    shard.write_bytes(shard.read_bytes()[:-7])


def corrupt_magic(shard: Path, meta: dict) -> None:
    shard.write_bytes(b"NOTOURS!" + shard.read_bytes()[8:])


def corrupt_dtype(shard: Path, meta: dict) -> None:
    """A shard written as uint32 where meta.json says uint16 (a same-size file: only the header can tell)."""
    data = np.fromfile(shard, dtype=np.uint16, offset=HEADER.size)
    shard.write_bytes(struct.pack("<8sIIQ8x", b"HGPTTOKS", 1, 4, len(data) // 2) + data.tobytes())


def corrupt_vocab(shard: Path, meta: dict) -> None:
    """meta.json claims a vocabulary that uint16 cannot hold."""
    meta["vocab_size"] = 70_000


def corrupt_token_ids(shard: Path, meta: dict) -> None:
    """Token ids beyond the vocabulary: data from another tokenizer."""
    data = np.fromfile(shard, dtype=np.uint16, offset=HEADER.size)
    data[5] = 60_000
    shard.write_bytes(shard.read_bytes()[: HEADER.size] + data.tobytes())


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (corrupt_truncated, r"train_000000\.bin is truncated or padded: 16,225 bytes, its header says 16,232"),
        (corrupt_magic, r"train_000000\.bin is not a hydragpt token shard \(bad magic\)"),
        (corrupt_dtype, r"train_000000\.bin stores uint32 tokens but meta\.json says uint16"),
        (corrupt_vocab, r"meta\.json is inconsistent: vocab 70000 stored as uint16, tokenizer vocab 28"),
        (
            corrupt_token_ids,
            r"the train split of 'shakespeare_char' holds token id 60000, outside its vocabulary of 28",
        ),
    ],
)
def test_damaged_shards_give_one_line_errors(dataset_dir: Path, corrupt, message: str) -> None:
    meta_path = dataset_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    corrupt(dataset_dir / "train_000000.bin", meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        open_prepared(dataset_dir)
    result = run_script("peek", f"paths.data_dir={dataset_dir.parent}")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "overwrite=true" in lines[0], result.stderr
