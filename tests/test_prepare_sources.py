"""Preparing `data=text` from .txt/.jsonl/.parquet files, directories, globs and Hugging Face datasets:
document separators, the three validation splits, parallel workers, sharding and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import hydragpt.data.prepare as prepare_module
from hydragpt.data.dataset import TokenDataset
from hydragpt.data.tokenizer import TiktokenTokenizer
from hydragpt.errors import UserError
from tests.helpers import open_prepared, prepare_dataset

EOT = 50256  # GPT-2's <|endoftext|>


def documents(n: int, seed: int = 0, words: int = 40) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = "the of and to in a is that for it with as was on be by at this from or had not but".split()
    return [" ".join(rng.choice(vocab, size=rng.integers(5, words))).capitalize() + f". Doc {i}." for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def all_tokens(dataset: TokenDataset, split: str) -> list[int]:
    tokens = dataset.splits[split]
    return tokens.read(0, len(tokens)).tolist()


def split_documents(tokens: list[int]) -> list[list[int]]:
    docs, current = [], []
    for t in tokens:
        if t == EOT:
            docs.append(current)
            current = []
        else:
            current.append(t)
    return [*docs, current]


def interrupt(monkeypatch: pytest.MonkeyPatch, function: str, call: int, *args: object) -> None:
    """Run `prepare_dataset(*args)` with Ctrl-C arriving at the `call`-th call of prepare's `function`."""
    real, calls = getattr(prepare_module, function), []

    def crash(*a: object, **k: object) -> object:
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as patched:
        patched.setattr(prepare_module, function, crash)
        with pytest.raises(SystemExit, match="130"):  # a warning that says how to continue, exit status 130
            prepare_dataset(*args)


def test_jsonl_documents_are_separated_by_eot_and_split_by_documents(gpt2_bpe: None, tmp_path: Path) -> None:
    docs = documents(400)
    source = write_jsonl(tmp_path / "corpus.jsonl", docs)
    dataset = open_prepared(prepare_dataset(tmp_path / "data", "text", source, "data.val_split=docs"))
    enc = TiktokenTokenizer("gpt2")
    train, val = all_tokens(dataset, "train"), all_tokens(dataset, "val")
    assert train[0] != EOT and val[0] == EOT  # a separator before every document but the corpus's first
    got = sorted(enc.decode(d) for d in split_documents(train) + split_documents(val)[1:])
    assert got == sorted(docs)
    assert dataset.meta.documents == 400 and 20 <= len(split_documents(val)) - 1 <= 60  # ~10% of 400


def test_the_same_corpus_as_txt_jsonl_parquet_directory_and_glob(gpt2_bpe: None, tmp_path: Path) -> None:
    docs = documents(50)
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(doc)
    write_jsonl(tmp_path / "corpus.jsonl", docs, field="body")
    pq.write_table(pa.table({"body": docs}), tmp_path / "corpus.parquet")
    variants = {
        "dir": [str(tmp_path / "txt")],
        "glob": [str(tmp_path / "txt" / "*.txt")],
        "jsonl": [str(tmp_path / "corpus.jsonl"), "data.text_field=body"],
        "parquet": [str(tmp_path / "corpus.parquet"), "data.text_field=body"],
    }
    results = {}
    for name, (source, *extra) in variants.items():
        dataset = open_prepared(prepare_dataset(tmp_path / name, "text", source, *extra))
        results[name] = (all_tokens(dataset, "train"), all_tokens(dataset, "val"), dataset.meta.documents)
    assert all(result == results["jsonl"] for result in results.values())
    train, val, n_docs = results["jsonl"]
    enc = TiktokenTokenizer("gpt2")
    assert n_docs == 50 and enc.decode(train + val) == "<|endoftext|>".join(docs)


def test_parallel_workers_write_the_same_shards_as_one_process(gpt2_bpe: None, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "corpus.jsonl", documents(12_000, words=60))  # ~3 MB: 3 tasks of 1 MB
    outputs = [
        prepare_dataset(tmp_path / f"w{w}", "text", source, f"workers={w}", "task_mb=1", "data.shard_tokens=150000")
        for w in (1, 2)
    ]
    files = sorted(p.name for p in outputs[0].iterdir())
    assert files == sorted(p.name for p in outputs[1].iterdir()) and len(files) > 4
    for name in files:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name


def test_head_split_and_fixed_size_shards(gpt2_bpe: None, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "corpus.jsonl", documents(300))
    out = prepare_dataset(
        tmp_path, "text", source, "data.val_split=head", "data.val_tokens=1000", "data.shard_tokens=700"
    )
    dataset = open_prepared(out)
    whole = open_prepared(
        prepare_dataset(tmp_path / "one_shard", "text", source, "data.val_split=head", "data.val_tokens=1000")
    )
    stream = all_tokens(whole, "val") + all_tokens(whole, "train")
    assert all_tokens(dataset, "val") == stream[:1000] and all_tokens(dataset, "train") == stream[1000:]
    sizes = [s["tokens"] for s in dataset.meta.shards["train"]]
    assert set(sizes[:-1]) == {700} and 0 < sizes[-1] <= 700 and sum(sizes) == len(stream) - 1000
    assert [s["tokens"] for s in dataset.meta.shards["val"]] == [700, 300]


def test_char_tokenizer_over_several_documents_separates_them_by_newline(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "corpus.jsonl", ["abc", "de", "fgh", "ij"] * 10)
    dataset = open_prepared(prepare_dataset(tmp_path, "text", source, "data.tokenizer=char"))
    text = dataset.tokenizer.decode(all_tokens(dataset, "train") + all_tokens(dataset, "val"))
    assert text == "\n".join(["abc", "de", "fgh", "ij"] * 10)
    # the last 10% of the characters (the last 4 documents), each with its separator
    assert dataset.tokenizer.decode(all_tokens(dataset, "val")) == "\nabc\nde\nfgh\nij"


def assert_same_files(out: Path, reference: Path) -> None:
    """A resumed preparation left exactly the files an uninterrupted one did, byte for byte."""
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for path in reference.iterdir():
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_interrupted_preparation_continues_to_the_same_result(
    gpt2_bpe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "corpus.jsonl", documents(12_000, words=60))
    args = ("workers=1", "task_mb=1", "data.shard_tokens=150000", "data.val_split=docs")
    reference = prepare_dataset(tmp_path / "reference", "text", source, *args)

    interrupt(monkeypatch, "_route", 2, tmp_path / "resumed", "text", source, *args)  # after a finished shard
    out = tmp_path / "resumed" / "text"
    assert (out / ".prepare" / "progress.json").is_file() and not (out / "meta.json").exists()
    with pytest.raises(UserError, match="interrupted preparation made with other settings or another corpus"):
        prepare_dataset(tmp_path / "resumed", "text", source, *args[:-1], "data.val_split=tail")
    prepare_dataset(tmp_path / "resumed", "text", source, *args)
    assert_same_files(out, reference)


def test_bad_jsonl_records_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad\.jsonl has a line that is not a JSON object"):
        prepare_dataset(tmp_path, "text", tmp_path / "bad.jsonl", "data.tokenizer=char")
    (tmp_path / "other.jsonl").write_text('{"body": "fine"}\n')
    with pytest.raises(UserError, match=r"without the field 'text' \(set data.text_field"):
        prepare_dataset(tmp_path, "text", tmp_path / "other.jsonl", "data.tokenizer=char", "workers=2")


def test_text_without_a_source_says_how_to_set_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.source is not set for data=text"):
        prepare_dataset(tmp_path, "text", "null")


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_source(gpt2_bpe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streaming: bool) -> None:
    import datasets

    docs = documents(30)
    seen = {}

    def load_dataset(name, config, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        table = datasets.Dataset.from_dict({"text": docs, "url": ["u"] * len(docs)})
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    overrides = ("data.val_tokens=50", f"data.streaming={streaming}")
    dataset = open_prepared(prepare_dataset(tmp_path, "fineweb_edu", "hf:org/corpus", *overrides))
    assert seen == {"name": "org/corpus", "config": "sample-10BT", "split": "train", "streaming": streaming}
    enc = TiktokenTokenizer("gpt2")
    assert enc.decode(all_tokens(dataset, "val") + all_tokens(dataset, "train")) == "<|endoftext|>".join(docs)
    assert dataset.meta.tokens["val"] == 50
    assert dataset.meta.settings["source"] == "hf:org/corpus" and dataset.meta.settings["hf_name"] == "sample-10BT"


def test_unreachable_hugging_face_dataset_names_it_and_the_local_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"HuggingFaceFW/fineweb-edu \(sample-10BT\).*data.source=<that dir>"):
        prepare_dataset(tmp_path, "fineweb_edu", "hf:HuggingFaceFW/fineweb-edu")
    assert not (tmp_path / "fineweb_edu").exists()


def test_interrupted_between_finishing_a_shard_and_recording_it(
    gpt2_bpe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard renamed to its final name whose progress record never landed is reopened, not lost."""
    source = write_jsonl(tmp_path / "corpus.jsonl", documents(12_000, words=60))
    args = ("workers=1", "task_mb=1", "data.shard_tokens=100000", "data.val_split=docs")
    reference = prepare_dataset(tmp_path / "reference", "text", source, *args)
    interrupt(monkeypatch, "_save_record", 2, tmp_path / "resumed", "text", source, *args)
    assert_same_files(prepare_dataset(tmp_path / "resumed", "text", source, *args), reference)


def test_overwrite_with_a_bad_corpus_keeps_the_prepared_dataset(gpt2_bpe: None, tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", documents(100))
    out = prepare_dataset(tmp_path / "data", "text", good)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 42}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: field 'text' holds int, not text"):
        prepare_dataset(tmp_path / "data", "text", tmp_path / "bad.jsonl", "overwrite=true")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_changed_corpus_is_not_mixed_into_an_interrupted_preparation(
    gpt2_bpe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = write_jsonl(tmp_path / "corpus.jsonl", documents(12_000, words=60))
    args = ("workers=1", "task_mb=1", "data.shard_tokens=100000")
    interrupt(monkeypatch, "_route", 2, tmp_path, "text", source, *args)
    with open(source, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(UserError, match=r"another corpus.*overwrite=true"):
        prepare_dataset(tmp_path, "text", source, *args)


def test_leading_empty_documents_and_odd_text(gpt2_bpe: None, tmp_path: Path) -> None:
    """No separator before the first document with text; null is an empty document; lone surrogates
    are replaced, as encode_ordinary does."""
    lines = [{"text": ""}, {"text": None}, {"text": "Hello world"}, {"text": "a\ud800b"}, {"text": "x " * 50}]
    source = tmp_path / "odd.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = open_prepared(prepare_dataset(tmp_path, "text", source))
    tokens = all_tokens(dataset, "train") + all_tokens(dataset, "val")
    enc = TiktokenTokenizer("gpt2")
    assert tokens[:2] == enc.encode("Hello world") and tokens[2] == EOT
    assert enc.decode(tokens) == "Hello world<|endoftext|>a\ufffdb<|endoftext|>" + "x " * 50


def test_parquet_column_that_is_not_text(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    with pytest.raises(UserError, match=r"numbers\.parquet: column 'text' holds int64, not text"):
        prepare_dataset(tmp_path, "text", tmp_path / "numbers.parquet")


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_txt_without_plain_newlines_is_still_chunked_without_changing_tokens(
    gpt2_bpe: None, tmp_path: Path, corpus_file: Path, newline: str
) -> None:
    """CRLF text or blank-line paragraphs have no newline cut point: chunks are cut between words."""
    text = corpus_file.read_text().replace("\n", newline)
    (tmp_path / "corpus.txt").write_bytes(text.encode())
    from hydragpt.data.sources import _txt_records

    chunks = [r.payload for r in _txt_records(tmp_path / "corpus.txt", chunk_bytes=64 * 1024)]
    assert len(chunks) > 10 and "".join(chunks) == text and max(map(len, chunks)) < 80 * 1024
    enc = TiktokenTokenizer("gpt2")
    assert [t for chunk in chunks for t in enc.encode(chunk)] == enc.encode(text)


def test_overwrite_interrupted_while_publishing_finishes_on_the_next_run(
    gpt2_bpe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after the old dataset's files are gone but before the new meta.json: the next run, with
    overwrite=true or without, moves the finished shards in and writes meta.json."""
    old, new = write_jsonl(tmp_path / "old.jsonl", documents(50)), write_jsonl(tmp_path / "new.jsonl", documents(80, 1))
    reference = prepare_dataset(tmp_path / "reference", "text", new, "data.shard_tokens=500")
    for rerun in (("overwrite=true",), ()):
        data = tmp_path / f"data{len(rerun)}"
        prepare_dataset(data, "text", old, "data.shard_tokens=500")
        interrupt(monkeypatch, "write_meta", 1, data, "text", new, "data.shard_tokens=500", "overwrite=true")
        assert not (data / "text" / "meta.json").exists()
        out = prepare_dataset(data, "text", new, "data.shard_tokens=500", *rerun)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
        for path in reference.iterdir():
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_parquet_category_column_is_text(gpt2_bpe: None, tmp_path: Path) -> None:
    docs = ["alpha beta", "gamma delta", "alpha beta"] * 10
    pq.write_table(pa.table({"text": pa.array(docs).dictionary_encode()}), tmp_path / "cats.parquet")
    dataset = open_prepared(prepare_dataset(tmp_path, "text", tmp_path / "cats.parquet"))
    assert TiktokenTokenizer("gpt2").decode(all_tokens(dataset, "train") + all_tokens(dataset, "val")) == (
        "<|endoftext|>".join(docs)
    )


def test_absurdly_nested_json_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "deep.jsonl").write_text("[" * 200_000 + "]" * 200_000 + "\n")
    with pytest.raises(UserError, match=r"deep\.jsonl has a line that is not a JSON object"):
        prepare_dataset(tmp_path, "text", tmp_path / "deep.jsonl", "data.tokenizer=char", "workers=1")
