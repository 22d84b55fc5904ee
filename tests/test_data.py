"""Preparing Tiny Shakespeare (char and GPT-2 BPE): nanoGPT's split, exact round trips, idempotence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hydragpt.config import prepare_config
from hydragpt.data.dataset import TokenDataset
from hydragpt.data.prepare import prepare
from hydragpt.data.sources import safe_cut
from hydragpt.data.tokenizer import CharTokenizer, TiktokenTokenizer, token_dtype, tokenizer_from_description
from hydragpt.errors import UserError
from tests.helpers import compose_config, open_prepared, prepare_dataset


def prepare_text(tmp_path: Path, text: str, overwrite: bool = False) -> Path:
    source = tmp_path / "corpus.txt"
    source.write_text(text)
    return prepare_dataset(tmp_path / "data", "shakespeare_char", source, f"overwrite={overwrite}")


def decoded_splits(dataset: TokenDataset) -> dict[str, str]:
    return {s: dataset.tokenizer.decode(t.read(0, len(t)).tolist()) for s, t in dataset.splits.items()}


def test_char_prepare_splits_90_10_and_round_trips(data_dir: Path, corpus_file: Path) -> None:
    text = corpus_file.read_text()
    dataset = open_prepared(data_dir / "shakespeare_char")
    meta = dataset.meta
    n_train = int(len(text) * 0.9)
    assert meta.tokens == {"train": n_train, "val": len(text) - n_train}
    assert meta.vocab_size == len(set(text)) == dataset.tokenizer.vocab_size and meta.dtype == "uint16"
    splits = decoded_splits(dataset)
    assert splits["train"] + splits["val"] == text and len(splits["train"]) == n_train
    if len(text) == 1_115_394:  # the real tiny Shakespeare: nanoGPT's numbers
        assert meta.tokens == {"train": 1_003_854, "val": 111_540} and meta.vocab_size == 65


@pytest.mark.parametrize("task_mb", [4, 1])
def test_gpt2_prepare_matches_encoding_the_whole_text(
    gpt2_bpe: None, tmp_path: Path, corpus_file: Path, task_mb: int
) -> None:
    """Tokens equal encode_ordinary of the text, also when the corpus is tokenized in 1 MB chunks."""
    text = corpus_file.read_text()
    out = prepare_dataset(tmp_path, "shakespeare_gpt2", corpus_file, f"task_mb={task_mb}")
    dataset = open_prepared(out)
    enc = TiktokenTokenizer("gpt2")
    n_train = int(len(text) * 0.9)  # nanoGPT's split point, in characters
    train, val = (dataset.splits[s].read(0, len(dataset.splits[s])).tolist() for s in ("train", "val"))
    assert train == enc.encode(text[:n_train]) and val == enc.encode(text[n_train:])
    assert len(train) + len(val) == len(enc.encode(text))
    assert enc.decode(train) + enc.decode(val) == text
    assert dataset.meta.tokenizer == {"kind": "tiktoken", "name": "gpt2"} and dataset.meta.vocab_size == 50257
    if len(text) == 1_115_394:
        assert (len(train), len(val)) == (301_966, 36_059)  # 338,025 in all


def test_safe_cuts_never_change_bpe_tokens(gpt2_bpe: None) -> None:
    rng = np.random.default_rng(0)
    pieces = ["word", " word", "\n", "\n\n", " \n", "\r\n", "  ", ".", "'s", "42", "é", "\t", "—", "Ünï"]
    enc = TiktokenTokenizer("gpt2")
    for _ in range(200):
        text = "".join(rng.choice(pieces, size=60))
        cut = safe_cut(text)
        if cut is not None:
            after_newline = text[cut - 1] == "\n" and not text[cut - 2].isspace() and not text[cut].isspace()
            between_words = text[cut] == " " and text[cut - 1].isalpha() and text[cut + 1].isalpha()
            assert after_newline or between_words
            assert enc.encode(text[:cut]) + enc.encode(text[cut:]) == enc.encode(text)
    assert safe_cut("a\n\nb") is None and safe_cut("a \nb") is None and safe_cut("a\r\n1") is None
    assert safe_cut("x.\n/usr") is None  # o200k's punctuation pieces take newlines and a "/" after them
    assert safe_cut("a\nb\nc") == 4 and safe_cut("ab cd\r\n") == 2 and safe_cut("x\nab cd", start=3) == 4


def test_prepare_is_idempotent_unless_overwrite(tmp_path: Path) -> None:
    out = prepare_text(tmp_path, "hello world, " * 100)
    shard = out / "train_000000.bin"
    stamp = shard.stat().st_mtime_ns
    prepare_text(tmp_path, "different text entirely " * 100)
    assert shard.stat().st_mtime_ns == stamp
    assert open_prepared(out).meta.vocab_size == len(set("hello world, "))
    prepare_text(tmp_path, "different text entirely " * 100, overwrite=True)
    assert open_prepared(out).meta.vocab_size == len(set("different text entirely "))


def test_meta_from_another_version_asks_for_overwrite(tmp_path: Path) -> None:
    out = prepare_text(tmp_path, "hello world, " * 100)
    (out / "meta.json").write_text(json.dumps({"tokenizer": {}, "vocab_size": 3, "tokens": {}, "source": ""}))
    with pytest.raises(UserError, match=r"written by another version.*overwrite=true"):
        prepare_text(tmp_path, "hello world, " * 100)
    prepare_text(tmp_path, "hello world, " * 100, overwrite=True)
    assert open_prepared(out).meta.tokens["train"] == 1170


def test_prepare_rejects_empty_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"corpus\.txt is empty"):
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
    assert open_prepared(dataset_dir).meta.vocab_size == len(set("to be or not to be "))
    prepare(prepare_config(compose_config("prepare", [f"paths.data_dir={tmp_path}", "overwrite=true"])))
    assert (dataset_dir / "input.txt").is_file()  # overwrite redoes the tokens, keeps the download


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


def test_token_dtype_fits_the_vocabulary() -> None:
    assert token_dtype(65) == np.uint16 and token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100277) == np.uint32  # cl100k_base


def test_block_must_fit_in_every_split(tmp_path: Path) -> None:
    dataset = open_prepared(prepare_text(tmp_path, "abcdefgh" * 10))
    dataset.require_block(7)
    with pytest.raises(UserError, match=r"val split .* has 8 tokens, fewer than one block"):
        dataset.require_block(64)
