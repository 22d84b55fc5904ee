"""scripts/eval.py: loss over a whole split, HellaSwag accuracy, both against references computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hydragpt.engine.checkpoint import load_checkpoint
from hydragpt.loggers import read_metrics
from hydragpt.sampling import load_model
from tests.helpers import open_prepared, run_script, torchrun

# Official hellaswag_val.jsonl fields; texts use only characters of the Shakespeare char vocabulary.
FIXTURE = [
    {"ctx": "ROMEO: What light through yonder", "endings": ["window breaks.", "cat sat.", "zzz qqq.", "and then"]},
    {"ctx": "JULIET: O Romeo, Romeo, wherefore", "endings": ["art thou Romeo?", "xq jv.", "the the the", "ok"]},
    {"ctx": "To be, or not to be, that is the", "endings": ["question.", "banana.", "kkkk", "on the way home"]},
    {"ctx": "KING: My lord, the", "endings": ["queen is dead.", "qq", "of the king", "zzzz zzzz zzzz"]},
    {"ctx": "Friends, Romans, countrymen, lend me your", "endings": ["ears;", "xx", "shoes and hats", "b"]},
    {"ctx": "Now is the winter of our", "endings": ["discontent", "q", "summer days are here", "vvv"]},
]


@pytest.fixture
def hellaswag_file(tmp_path: Path) -> Path:
    path = tmp_path / "hellaswag_val.jsonl"
    lines = []
    for i, e in enumerate(FIXTURE):
        ctx_a, ctx_b = e["ctx"].rsplit(" ", 1)  # the official file's ctx is ctx_a + " " + ctx_b
        label = {"label": i % 4, "split_type": "zeroshot" if i % 2 else "indomain", "ind": i}
        lines.append({"activity_label": "Drama", "ctx_a": ctx_a, "ctx_b": ctx_b, **e, **label})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_val_loss_over_the_whole_split(trained_run: Path, data_dir: Path, tmp_path: Path) -> None:
    common = ("eval", f"ckpt={trained_run}", f"paths.data_dir={data_dir}", "task=val_loss", "batch_size=5")
    result = run_script(*common)
    assert result.returncode == 0, result.stderr
    got = last_json(result.stdout)
    model, _ = load_model(load_checkpoint(trained_run), torch.device("cpu"))
    tokens = np.concatenate([np.asarray(s) for s in open_prepared(data_dir / "shakespeare_char").splits["val"].shards])
    tokens = torch.from_numpy(tokens.astype(np.int64))
    block, total = model.config.block_size, 0.0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, block):  # every token but the first, predicted once
            window = tokens[start : start + block + 1]
            logits, _ = model(window[None, :-1])
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    assert got["n_tokens"] == len(tokens) - 1
    assert got["loss"] == pytest.approx(total / (len(tokens) - 1), rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]))
    # ASCII text, a token per character: a byte per token, so bits per byte is the loss in bits
    assert got["n_bytes"] == got["n_tokens"] and got["bpb"] == pytest.approx(got["loss"] / math.log(2), rel=1e-9)

    ranks = torchrun(2, *common[1:], cwd=tmp_path, script="eval")
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert last_json(ranks.stdout)["loss"] == pytest.approx(got["loss"], rel=1e-6)  # other batches, same sums


def test_training_records_bits_per_byte(trained_run: Path) -> None:
    """A char model on ASCII text: each evaluation's bits per byte is its loss over ln 2."""
    evals = [r for r in read_metrics(trained_run) if "val_loss" in r]
    assert evals
    for record in evals:
        for split in ("train", "val"):
            assert record[f"{split}_bpb"] == pytest.approx(record[f"{split}_loss"] / math.log(2), rel=1e-6)


@pytest.mark.parametrize("method", ["lm_eval", "build_nanogpt"])
def test_hellaswag_matches_a_reference_computed_by_hand(trained_run: Path, hellaswag_file: Path, method: str) -> None:
    """lm_eval: "<activity>: <ctx_a> <Ctx_b>", acc_norm per character of the ending; build_nanogpt: ctx as
    it is, acc_norm per token."""
    result = run_script(
        "eval",
        f"ckpt={trained_run}",
        "task=hellaswag",
        f"hellaswag.path={hellaswag_file}",
        f"hellaswag.method={method}",
        "show_examples=2",
    )
    assert result.returncode == 0, result.stderr
    got = last_json(result.stdout)
    model, tokenizer = load_model(load_checkpoint(trained_run), torch.device("cpu"))
    correct = correct_norm = 0
    by_type: dict[str, list[int]] = {"zeroshot": [], "indomain": []}
    with torch.no_grad():
        for line in hellaswag_file.read_text().splitlines():
            example = json.loads(line)
            text = example["ctx"]
            if method == "lm_eval":
                text = f"Drama: {example['ctx_a']} {example['ctx_b'][0].upper()}{example['ctx_b'][1:]}"
            context = tokenizer.encode(text)
            sums, norms = [], []
            for ending in example["endings"]:
                ending_ids = tokenizer.encode(" " + ending)
                ids = torch.tensor(context + ending_ids)[
                    -(model.config.block_size + 1) :
                ]  # a long context keeps its end
                logits, _ = model(ids[None, :-1])
                losses = F.cross_entropy(logits[0], ids[1:], reduction="none")[-len(ending_ids) :]
                sums.append(losses.sum().item())
                norms.append(losses.sum().item() / (len(ending) if method == "lm_eval" else len(ending_ids)))
            correct += int(np.argmin(sums)) == example["label"]
            hit = int(np.argmin(norms)) == example["label"]
            correct_norm += hit
            by_type[example["split_type"]].append(hit)
    assert got["n"] == len(FIXTURE)
    assert got["acc"] == correct / len(FIXTURE) and got["acc_norm"] == correct_norm / len(FIXTURE)
    assert got["acc_norm_zeroshot"] == sum(by_type["zeroshot"]) / 3
    assert got["acc_norm_indomain"] == sum(by_type["indomain"]) / 3
    assert result.stdout.count("context: ") == 2 and "predicted" in result.stdout
    assert ("per character" in result.stdout) == (method == "lm_eval")


def test_hellaswag_offline_without_the_file(trained_run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "hellaswag_val.jsonl"
    result = run_script(
        "eval",
        f"ckpt={trained_run}",
        "task=hellaswag",
        f"hellaswag.path={missing}",
        "hellaswag.url=http://127.0.0.1:9/x",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: cannot download HellaSwag from http://127.0.0.1:9/x")
    )
    assert not missing.exists() and "Traceback" not in result.stderr


def test_hellaswag_during_training_and_per_example_results(
    train_run, trained_run: Path, hellaswag_file: Path, tmp_path: Path
) -> None:
    """train.hellaswag_interval adds the score to evaluation records; eval.py out= keeps every example's."""
    result = train_run(
        "train.max_iters=4", "train.eval_interval=2", "train.hellaswag_interval=2", f"hellaswag.path={hellaswag_file}"
    )
    assert result.returncode == 0, result.stderr
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 2, 4] and all(0 <= r["hellaswag_acc_norm"] <= 1 for r in evals)
    assert "hellaswag acc_norm" in result.stdout

    out = tmp_path / "hellaswag.json"
    scored = run_script(
        "eval", f"ckpt={trained_run}", "task=hellaswag", f"hellaswag.path={hellaswag_file}", f"out={out}"
    )
    assert scored.returncode == 0, scored.stderr
    summary = json.loads(out.read_text())
    examples = [json.loads(line) for line in Path(f"{out}.examples.jsonl").read_text().splitlines()]
    assert [e["index"] for e in examples] == list(range(len(FIXTURE)))
    assert summary["acc_norm"] == sum(e["pred_norm"] == e["label"] for e in examples) / len(FIXTURE)


def test_hellaswag_interval_must_fall_on_evaluations(train_run) -> None:
    result = train_run("train.eval_interval=10", "train.hellaswag_interval=15")
    assert result.returncode == 2
    assert "train.hellaswag_interval=15 is not a multiple of train.eval_interval=10" in result.stderr
