"""scripts/train_tokenizer.py: a byte-level BPE of one's own, learned from a dataset's text, used to prepare,
train and sample, and carried by checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tiktoken
import torch

from hydragpt.data.tokenizer import BpeTokenizer
from tests.helpers import DEBUG_RUN, run_script


def train_tokenizer(corpus: Path, data_dir: Path, *overrides: str) -> dict:
    result = run_script(
        "train_tokenizer",
        "data=text",
        "data.name=corpus",
        f"data.source={corpus}",
        f"paths.data_dir={data_dir}",
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_4k_tokenizer_round_trips_and_compresses_better_than_gpt2(
    corpus_file: Path, tmp_path: Path, gpt2_bpe: None
) -> None:
    """Learned from the first 90% of the corpus; on the held-out tail it decodes back exactly and spends
    fewer tokens than GPT-2's encoding (more UTF-8 bytes per token)."""
    report = train_tokenizer(corpus_file, tmp_path, "vocab_size=4096")
    path = Path(report["tokenizer"])
    assert path == tmp_path / "tokenizers" / "corpus_4096.json" and report["vocab_size"] == 4096
    tokenizer = BpeTokenizer(json.loads(path.read_text()))
    text = corpus_file.read_text()
    tail = text[report["train_chars"] :]
    assert len(tail.encode()) == report["val_bytes"] > 0.09 * len(text)
    assert tokenizer.decode(tokenizer.encode(tail)) == tail and report["round_trip"]
    assert report["bytes_per_token"] == len(tail.encode()) / len(tokenizer.encode(tail))
    gpt2 = len(tail.encode()) / len(tiktoken.get_encoding("gpt2").encode_ordinary(tail))
    assert report["gpt2_bytes_per_token"] == gpt2 and report["bytes_per_token"] > gpt2
    assert [tokenizer.special[name] for name in ("<|bos|>", "<|assistant_end|>")] == [4091, 4095]
    assert tokenizer.separator == 4091 and tokenizer.token_bytes()[4091:].tolist() == [0] * 5


def test_prepare_train_and_sample_with_ones_own_tokenizer(corpus_file: Path, tmp_path: Path) -> None:
    """data.tokenizer=<file> prepares the data; the run's checkpoint carries the tokenizer, so sample.py
    needs neither the file nor the dataset."""
    report = train_tokenizer(corpus_file, tmp_path, "vocab_size=600")
    own = tmp_path / "own.json"
    shutil.move(report["tokenizer"], own)
    data = ("data=text", "data.name=own", f"data.source={corpus_file}", f"data.tokenizer={own}")
    prepared = run_script("prepare", *data, f"paths.data_dir={tmp_path}")
    assert prepared.returncode == 0, prepared.stderr
    run = tmp_path / "run"
    trained = run_script(
        "train", *DEBUG_RUN, *data, f"paths.data_dir={tmp_path}", f"hydra.run.dir={run}", "train.max_iters=4"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    carried = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["tokenizer"]
    assert carried == json.loads(own.read_text()) and carried["kind"] == "bpe"
    own.unlink()
    shutil.rmtree(tmp_path / "own")
    sampled = run_script("sample", f"ckpt={run}", "start=ROMEO:", "max_new_tokens=8", "num_samples=1")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("ROMEO:")


def test_tokenizer_mistakes_are_one_line(corpus_file: Path, tmp_path: Path) -> None:
    small = run_script("train_tokenizer", f"data.source={corpus_file}", f"paths.data_dir={tmp_path}", "vocab_size=200")
    assert small.returncode == 2
    assert small.stderr.strip().splitlines()[-1].startswith("error: vocab_size=200 leaves no room for merges")
    missing = run_script("prepare", f"data.source={corpus_file}", f"data.tokenizer={tmp_path / 'none.json'}")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: data.tokenizer={tmp_path / 'none.json'}: no such tokenizer file"
        " (train it first: python scripts/train_tokenizer.py data=<option>)"
    )
