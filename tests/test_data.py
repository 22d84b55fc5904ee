"""Char data preparation (split, round trip, idempotence) and the batch loader (windows, exact state)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hydragpt.config import prepare_config
from hydragpt.data.dataset import RandomBatchLoader, TokenDataset, read_meta
from hydragpt.data.prepare import prepare
from hydragpt.data.tokenizer import CharTokenizer, tokenizer_from_description
from hydragpt.errors import UserError
from tests.conftest import compose_config


def prepare_text(tmp_path: Path, text: str, overwrite: bool = False) -> Path:
    source = tmp_path / "corpus.txt"
    source.write_text(text)
    cfg = prepare_config(
        compose_config(
            "prepare",
            [f"paths.data_dir={tmp_path / 'data'}", f"data.source={source}", f"overwrite={overwrite}"],
        )
    )
    return prepare(cfg)


def test_prepare_splits_90_10_and_round_trips(data_dir: Path, corpus_file: Path) -> None:
    text = corpus_file.read_text()
    dataset = TokenDataset(data_dir / "shakespeare_char")
    meta = dataset.meta
    n_train = int(len(text) * 0.9)
    assert meta.tokens == {"train": n_train, "val": len(text) - n_train}
    assert meta.vocab_size == len(set(text)) == dataset.tokenizer.vocab_size
    decoded = "".join(dataset.tokenizer.decode(dataset.splits[s].tolist()) for s in ("train", "val"))
    assert decoded == text
    if len(text) == 1_115_394:  # the real tiny Shakespeare: nanoGPT's numbers
        assert meta.tokens == {"train": 1_003_854, "val": 111_540} and meta.vocab_size == 65


def test_prepare_is_idempotent_unless_overwrite(tmp_path: Path) -> None:
    out = prepare_text(tmp_path, "hello world, " * 100)
    train_bin = out / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    prepare_text(tmp_path, "different text entirely " * 100)
    assert train_bin.stat().st_mtime_ns == stamp
    assert read_meta(out).vocab_size == len(set("hello world, "))
    prepare_text(tmp_path, "different text entirely " * 100, overwrite=True)
    assert read_meta(out).vocab_size == len(set("different text entirely "))


def test_prepare_rejects_empty_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is empty"):
        prepare_text(tmp_path, "")
    cfg = prepare_config(compose_config("prepare", [f"paths.data_dir={tmp_path}", "data.source=/no/such/file.txt"]))
    with pytest.raises(UserError, match="does not exist"):
        prepare(cfg)


def test_cached_download_is_reused_without_network(tmp_path: Path) -> None:
    """A corpus placed in the dataset directory beforehand is used instead of downloading."""
    dataset_dir = tmp_path / "shakespeare_char"
    dataset_dir.mkdir()
    (dataset_dir / "input.txt").write_text("to be or not to be " * 50)
    cfg = prepare_config(compose_config("prepare", [f"paths.data_dir={tmp_path}"]))
    assert cfg.data.source.startswith("https://")
    prepare(cfg)
    assert read_meta(dataset_dir).vocab_size == len(set("to be or not to be "))


def test_unreachable_url_names_it_and_the_fix(tmp_path: Path) -> None:
    cfg = prepare_config(
        compose_config("prepare", [f"paths.data_dir={tmp_path}", "data.source=http://127.0.0.1:9/input.txt"])
    )
    with pytest.raises(UserError, match=r"could not download http://127.0.0.1:9/input.txt.*data.source=<local path>"):
        prepare(cfg)
    assert not list(tmp_path.glob("**/*.part"))


def test_char_tokenizer_round_trip_and_unknown_characters() -> None:
    tok = CharTokenizer.from_text("hello world")
    assert tok.decode(tok.encode("hello")) == "hello"
    assert tokenizer_from_description(json.loads(json.dumps(tok.describe()))).encode("low") == tok.encode("low")
    with pytest.raises(UserError, match=r"2 character\(s\) outside the char vocabulary: 'Z', 'é'"):
        tok.encode("hello Zé")


def test_loader_windows_are_shifted_by_one() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    loader = RandomBatchLoader(tokens, batch_size=8, block_size=16, seed=0, device=torch.device("cpu"))
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(y, x + 1)  # arange data: each target is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)


def test_loader_state_restores_the_exact_batch_sequence() -> None:
    tokens = np.random.default_rng(0).integers(0, 65, 5000).astype(np.uint16)
    loader = RandomBatchLoader(tokens, batch_size=4, block_size=8, seed=1, device=torch.device("cpu"))
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(5)]
    other = RandomBatchLoader(tokens, batch_size=4, block_size=8, seed=999, device=torch.device("cpu"))
    other.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, (other.next_batch() for _ in range(5)), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_token_counts_are_checked_against_meta(tmp_path: Path) -> None:
    out = prepare_text(tmp_path, "abcdefgh" * 100)
    with open(out / "val.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(UserError, match=r"val\.bin holds 81 tokens but meta\.json says 80"):
        TokenDataset(out)


def test_block_must_fit_in_every_split(tmp_path: Path) -> None:
    dataset = TokenDataset(prepare_text(tmp_path, "abcdefgh" * 10))
    dataset.require_block(7)
    with pytest.raises(UserError, match=r"val split .* has 8 tokens, fewer than one block"):
        dataset.require_block(64)
