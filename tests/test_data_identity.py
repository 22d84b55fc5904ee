"""What a run records is what it did, for its data: a prepared dataset records the settings it was prepared
with and a fingerprint of its tokens; a run asking for other settings, a resume or an evaluation on other
tokens, is refused with a fix that works when typed."""

from __future__ import annotations

import hashlib
import json
import random
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from hydragpt.config import DataConfig
from hydragpt.data.dataset import DatasetMeta, dataset_fingerprint, setting_differences
from hydragpt.data.identity import other_data, prepare_command
from hydragpt.data.shards import HEADER, ShardWriter
from hydragpt.errors import UserError
from tests.helpers import open_prepared, prepare_dataset, run_script, train_debug
from tests.test_errors import assert_user_error

WORDS = "the king and queen of england shall speak to thee my lord what say you now".split()


def write_corpus(path: Path, seed: int, lines: int) -> Path:
    """English-like text whose characters are always the same set: char datasets of two such corpora have
    one tokenizer, and other tokens."""
    rng = random.Random(seed)
    body = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(lines)]
    path.write_text("\n".join(["abcdefghijklmnopqrstuvwxyz ,.", *body]) + "\n")
    return path


def train(data_dir: Path, run_dir: Path, *overrides: str):
    return train_debug(data_dir, run_dir, "train.max_iters=4", "train.eval_interval=2", *overrides)


def error_line(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """The files of a run that a refused resume must leave as they were."""
    names = (".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.pt")
    return {name: (run_dir / name).read_bytes() for name in names}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    return {
        "a": write_corpus(root / "a.txt", seed=0, lines=400),
        "b": write_corpus(root / "b.txt", seed=1, lines=400),
        "short": write_corpus(root / "short.txt", seed=2, lines=300),
    }


@pytest.fixture(scope="module")
def run_on_a(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path]) -> tuple[Path, Path]:
    """A 4-step debug run on a char dataset prepared from corpus a: (its data_dir, its run directory)."""
    root = tmp_path_factory.mktemp("run_on_a")
    prepare_dataset(root / "data", "shakespeare_char", corpora["a"])
    result = train(root / "data", root / "run")
    assert result.returncode == 0, result.stderr
    return root / "data", root / "run"


# --- meta.json: settings, shard hashes, fingerprint ------------------------------------------------


def test_meta_records_settings_shard_hashes_and_fingerprint(tmp_path: Path, corpora: dict[str, Path]) -> None:
    out = prepare_dataset(tmp_path / "one", "shakespeare_char", corpora["a"], "data.shard_tokens=4000")
    meta = open_prepared(out).meta
    assert meta.settings == {
        "tokenizer": "char",
        "val_split": "tail",
        "val_fraction": 0.1,
        "val_tokens": None,
        "split_seed": 2357,
        "text_field": "text",
        "hf_name": None,
        "hf_split": "train",
        "format": "text",
        "prompt_field": None,
        "response_field": None,
        "max_conversation_tokens": 2048,
        "source": str(corpora["a"]),
    }
    assert len(meta.shards["train"]) > 1
    for shards in meta.shards.values():
        for shard in shards:  # the sha256 of the tokens after the header
            assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()[HEADER.size :]).hexdigest()
    assert meta.fingerprint == dataset_fingerprint(meta.tokenizer, meta.shards)
    again = prepare_dataset(tmp_path / "two", "shakespeare_char", corpora["a"], "data.shard_tokens=4000")
    assert open_prepared(again).meta.fingerprint == meta.fingerprint  # the same corpus, the same way: same data
    other = prepare_dataset(tmp_path / "three", "shakespeare_char", corpora["b"], "data.shard_tokens=4000")
    assert open_prepared(other).meta.fingerprint != meta.fingerprint


def test_a_hand_edited_shard_list_is_refused(tmp_path: Path, corpora: dict[str, Path]) -> None:
    out = prepare_dataset(tmp_path, "shakespeare_char", corpora["a"])
    meta = json.loads((out / "meta.json").read_text())
    meta["shards"]["train"][0]["sha256"] = "0" * 64
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"fingerprint does not match its shard list.*overwrite=true"):
        open_prepared(out)


def test_an_interrupted_writer_hashes_its_shards_as_one_that_ran_through(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    whole = ShardWriter(tmp_path / "whole", "train", np.dtype(np.uint16), shard_tokens=300)
    (tmp_path / "whole").mkdir()
    whole.write(tokens)
    whole.close()
    (tmp_path / "cut").mkdir()
    first = ShardWriter(tmp_path / "cut", "train", np.dtype(np.uint16), shard_tokens=300)
    first.write(tokens[:450])
    first.flush()
    resumed = ShardWriter(tmp_path / "cut", "train", np.dtype(np.uint16), shard_tokens=300)
    resumed.restore(**first.state())
    resumed.write(tokens[450:])
    resumed.close()
    assert resumed.shard_sha256 == whole.shard_sha256 and len(whole.shard_sha256) == 4


def test_split_knobs_the_split_does_not_read_are_no_difference() -> None:
    tail = {"val_split": "tail", "val_fraction": 0.1, "val_tokens": None, "split_seed": 2357, "tokenizer": "char"}
    keys = ("val_split", "val_fraction", "val_tokens", "split_seed", "tokenizer")
    assert setting_differences(tail, {**tail, "split_seed": 1, "val_tokens": 5}, keys) == []
    assert setting_differences(tail, {**tail, "val_fraction": 0.2, "tokenizer": "gpt2"}, keys) == [
        "val_fraction",
        "tokenizer",
    ]
    docs = {**tail, "val_split": "docs"}
    assert setting_differences(docs, {**docs, "split_seed": 1}, keys) == ["split_seed"]


def test_other_data_names_the_token_counts_that_differ() -> None:
    meta = DatasetMeta(3, {}, 3, "uint16", {}, 1, {"train": 90, "val": 10}, {}, fingerprint="new")
    assert other_data(None, meta) is None  # a pretrained import: no data to check
    assert other_data({"fingerprint": "new", "tokens": {}}, meta) is None
    assert other_data({"fingerprint": "old", "tokens": {"train": 90, "val": 10}}, meta) == "as many tokens, other ones"
    then = {"fingerprint": "old", "tokens": {"train": 80, "val": 10}}
    assert other_data(then, meta) == "train 80 tokens then, 90 now"


def test_prepare_command_adds_what_differs_from_the_option() -> None:
    """Outside a Hydra app the option is `text` (the schema's defaults): the command is still exact."""
    data = {**asdict(DataConfig()), "name": "mine", "tokenizer": "char"}
    assert prepare_command("shakespeare_char", data, "data") == (
        "python scripts/prepare.py data=text data.name=mine data.source=<your corpus> data.tokenizer=char"
    )
    assert prepare_command(None, {**data, "source": "a b.txt"}, "/d") == (
        "python scripts/prepare.py data=text data.name=mine 'data.source=a b.txt' data.tokenizer=char paths.data_dir=/d"
    )


# --- prepare, train and peek compare the settings ---------------------------------------------------


def test_prepare_refuses_a_dataset_prepared_with_other_settings(tmp_path: Path, corpora: dict[str, Path]) -> None:
    data = (f"paths.data_dir={tmp_path}", f"data.source={corpora['a']}")
    assert run_script("prepare", *data).returncode == 0
    meta = (tmp_path / "shakespeare_char" / "meta.json").read_bytes()

    result = run_script("prepare", *data, "data.tokenizer=gpt2")
    assert_user_error(result, "data.tokenizer=char", "data.tokenizer=gpt2", "overwrite=true")
    other_source = run_script("prepare", f"paths.data_dir={tmp_path}", f"data.source={corpora['b']}")
    assert_user_error(other_source, f"data.source={corpora['a']}", f"data.source={corpora['b']}")
    assert (tmp_path / "shakespeare_char" / "meta.json").read_bytes() == meta  # untouched

    # the default source (a URL) is not compared: a local copy of it is what users prepare from
    assert run_script("prepare", f"paths.data_dir={tmp_path}").returncode == 0
    # the fix's other name prepares the settings asked for beside it
    result = run_script("prepare", *data, "data.val_fraction=0.2")
    assert_user_error(result, "data.name=shakespeare_char_0.2")
    assert run_script("prepare", *data, "data.val_fraction=0.2", "data.name=shakespeare_char_0.2").returncode == 0
    assert open_prepared(tmp_path / "shakespeare_char_0.2").meta.settings["val_fraction"] == 0.2


def test_train_and_peek_refuse_settings_the_dataset_was_not_prepared_with(
    run_on_a: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir, _ = run_on_a
    result = train(data_dir, tmp_path / "run", "data.tokenizer=gpt2")
    assert_user_error(
        result,
        "was prepared with data.tokenizer=char, not data.tokenizer=gpt2",
        "ask for it as prepared (data.tokenizer=char)",
        "python scripts/prepare.py data=shakespeare_char data.name=shakespeare_char_gpt2",
    )
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory
    result = run_script("peek", f"paths.data_dir={data_dir}", "data.val_fraction=0.2")
    assert_user_error(result, "data.val_fraction=0.1, not data.val_fraction=0.2")


def test_a_missing_dataset_names_the_command_that_prepares_it(tmp_path: Path, corpora: dict[str, Path]) -> None:
    asked = ("data=text", "data.name=mine", "data.tokenizer=char", "data.val_fraction=0.2")
    result = train(tmp_path / "data", tmp_path / "run", *asked)
    assert_user_error(result, "dataset 'mine' is not prepared")
    assert not (tmp_path / "run").exists()
    command = error_line(result).split("`")[1].replace("<your corpus>", str(corpora["a"]))
    python, script, *args = shlex.split(command)
    assert (python, script) == ("python", "scripts/prepare.py")
    assert run_script("prepare", *args).returncode == 0
    result = train(tmp_path / "data", tmp_path / "run", *asked)
    assert result.returncode == 0, result.stderr


# --- resume and eval check the checkpoint's data ----------------------------------------------------


def test_resume_on_other_data_is_refused_and_changes_nothing(
    run_on_a: tuple[Path, Path], tmp_path: Path, corpora: dict[str, Path]
) -> None:
    _, trained = run_on_a
    prepare_dataset(tmp_path / "other", "shakespeare_char", corpora["b"])  # same name and settings, other text
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    result = train(tmp_path / "other", run, f"resume={run}", "train.max_iters=6")
    assert_user_error(
        result,
        "this run trained on other data than",
        "point paths.data_dir at the data it trained on",
        f"train.init_from={run}",
    )
    assert snapshot(run) == before
    # the fix: a new run that starts from its weights, on this data (one tokenizer: char over one character set)
    result = train(tmp_path / "other", tmp_path / "new", f"train.init_from={run}")
    assert result.returncode == 0, result.stderr


def test_resume_on_an_identical_copy_of_its_data(run_on_a: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, trained = run_on_a
    shutil.copytree(data_dir, tmp_path / "copy")
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    result = train(tmp_path / "copy", run, f"resume={run}", "train.max_iters=6")
    assert result.returncode == 0, result.stderr


def test_eval_of_the_checkpoints_dataset_wants_the_data_it_trained_on(
    run_on_a: tuple[Path, Path], tmp_path: Path, corpora: dict[str, Path]
) -> None:
    data_dir, run = run_on_a
    prepare_dataset(tmp_path / "other", "shakespeare_char", corpora["short"])
    common = ("eval", f"ckpt={run}", "task=val_loss", "limit=2")
    result = run_script(*common, f"paths.data_dir={tmp_path / 'other'}")
    assert_user_error(
        result, "holds other data than the checkpoint trained on", "tokens then", "dataset=shakespeare_char"
    )
    result = run_script(*common, f"paths.data_dir={tmp_path / 'other'}", "dataset=shakespeare_char")
    assert result.returncode == 0, result.stderr  # named explicitly: scored, as its tokenizer fits
    assert run_script(*common, f"paths.data_dir={data_dir}").returncode == 0
    result = run_script(*common, f"paths.data_dir={tmp_path / 'none'}")
    assert_user_error(result, f"run `python scripts/prepare.py data=shakespeare_char paths.data_dir={tmp_path}/none`")
