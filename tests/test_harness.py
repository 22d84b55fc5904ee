"""lm-evaluation-harness: our adapter against lm-eval's own `hf` model on one transformers GPT-2, and our
hand-written HellaSwag against lm-eval's hellaswag task, offline, on tasks and data the tests write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hydragpt.loggers import read_metrics
from tests.helpers import hf_gpt2, hf_gpt2_tokenizer, run_script, torchrun

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    {split}: {data}
  cache_dir: {cache}
{split}_split: {split}
"""
MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list: [{{metric: acc}}, {{metric: acc_norm}}]
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
"""
GENERATE = """output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: [" Trying", "\\n\\n"], max_gen_toks: 12, do_sample: false}}
metric_list: [{{metric: exact_match}}]
"""


def write_task(tasks: Path, name: str, rows: list[dict], body: str, split: str = "test") -> None:
    """A task of lm-eval's YAML format over a local jsonl, cached under tasks/ (nothing from the Hub)."""
    data = tasks / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    head = TASK.format(name=name, split=split, data=data, cache=tasks / "cache")
    (tasks / f"{name}.yaml").write_text(head + body.format())


def write_toy_tasks(tasks: Path) -> Path:
    """Three tasks, one per request kind, in characters the Shakespeare char vocabulary has."""
    tasks.mkdir()
    lines = ["the king said", "Romeo answered", "a Citizen cried", "the Nurse asked", "Juliet sighed", "ay"]
    choices = [" yes", " no, my lord", " the queen is dead", " farewell, farewell!"]
    questions = [{"question": f"Q: {line}", "choices": choices, "label": i % 4} for i, line in enumerate(lines)]
    write_task(tasks, "toy_mc", questions, MULTIPLE_CHOICE)
    speech = "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun. "
    write_task(tasks, "toy_ppl", [{"text": speech * (i + 1)} for i in range(3)], ROLLING)  # up to ~4 windows
    prompts = [{"prompt": f"KING: My lord {word},", "answer": "x"} for word in ("of York", "Clarence", "the", "")]
    write_task(tasks, "toy_gen", prompts, GENERATE)
    return tasks


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_bpe: None) -> Path:
    """A random 3-layer GPT-2 with GPT-2's tokenizer files, and the toy tasks."""
    root = tmp_path_factory.mktemp("harness")
    hf_gpt2(root / "gpt2")
    hf_gpt2_tokenizer(root / "gpt2")
    write_toy_tasks(root / "tasks")
    return root


def samples_by_task(path: Path) -> dict[str, dict[int, dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {task: {r["doc_id"]: r for r in records if r["task"] == task} for task in {r["task"] for r in records}}


def test_our_adapter_and_lm_evals_hf_model_agree(gpt2_dir: Path, tmp_path: Path) -> None:
    """Per example: the same log-likelihoods (1e-4) and greedy flags for multiple choice, the same rolling
    log-likelihoods, the same greedy text cut at the same stop string; so the same metrics."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = ["toy_mc", "toy_ppl", "toy_gen"]
    out = tmp_path / "result.json"
    result = run_script(
        "eval",
        "task=lm_eval",
        f"init_from=hf:{gpt2_dir / 'gpt2'}",
        f"lm_eval.tasks=[{','.join(tasks)}]",
        f"lm_eval.include_path={gpt2_dir / 'tasks'}",
        "batch_size=3",
        f"out={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    assert ours == json.loads(out.read_text())
    assert "|toy_mc |" in result.stdout and "|bits_per_byte  |" in result.stdout  # lm-eval's table, then ours
    mine = samples_by_task(Path(f"{out}.examples.jsonl"))

    reference = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(gpt2_dir / "gpt2"), device="cpu", batch_size=2),
        tasks=tasks,
        task_manager=TaskManager(include_path=str(gpt2_dir / "tasks"), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    theirs = {task: {s["doc_id"]: s for s in samples} for task, samples in reference["samples"].items()}
    assert {task: len(docs) for task, docs in mine.items()} == {"toy_mc": 6, "toy_ppl": 3, "toy_gen": 4}
    for doc_id, sample in theirs["toy_mc"].items():
        answers = zip(sample["filtered_resps"], mine["toy_mc"][doc_id]["filtered_resps"], strict=True)
        for (ll, greedy), (our_ll, our_greedy) in answers:
            assert our_ll == pytest.approx(ll, abs=1e-4) and our_greedy == greedy
    for doc_id, sample in theirs["toy_ppl"].items():
        assert mine["toy_ppl"][doc_id]["filtered_resps"][0] == pytest.approx(sample["filtered_resps"][0], abs=1e-4)
    texts = [mine["toy_gen"][doc_id]["filtered_resps"][0] for doc_id in sorted(theirs["toy_gen"])]
    assert texts == [theirs["toy_gen"][doc_id]["filtered_resps"][0] for doc_id in sorted(theirs["toy_gen"])]
    assert all(" Trying" not in text for text in texts) and len(set(texts)) > 1
    for task, metrics in ours["results"].items():
        for metric, value in metrics.items():
            assert value == pytest.approx(reference["results"][task][f"{metric},none"], rel=1e-6), (task, metric)
    assert ours["n"] == {"toy_mc": 6, "toy_ppl": 3, "toy_gen": 4}


def hellaswag_examples() -> list[dict]:
    """The official file's fields, with WikiHow's markup and a lower-case ctx_b, which lm-eval cleans up."""
    rows = [
        ("Making tea", "A man fills a kettle with water.", "he", ["boils it.", "[title] Sings a song.", "x", "eats"]),
        ("Skiing", "A woman stands on a snowy hill.", "she", ["skis down it.", "swims.", "reads a book.", "no"]),
        ("Home and Garden", "[header] How to plant a tree", "dig a hole.", ["[step] Water it.", "fly", "z", "sit"]),
        ("Cooking", "Eggs are cracked into a bowl.", "then", ["they are whisked.", "a car drives", "?", "done."]),
    ]
    return [
        {
            "ind": i,
            "activity_label": label,
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": f"{ctx_a} {ctx_b}",
            "endings": endings,
            "source_id": f"s{i}",
            "split": "val",
            "split_type": "indomain" if i % 2 else "zeroshot",
            "label": i % 4,
        }
        for i, (label, ctx_a, ctx_b, endings) in enumerate(rows)
    ]


def test_hand_written_hellaswag_and_lm_evals_task_agree(gpt2_dir: Path, tmp_path: Path) -> None:
    """The same examples in the official format, through eval.py task=hellaswag and through lm-eval's own
    hellaswag task (its YAML and its processing, reading the local file): the same acc and acc_norm, and
    the same prediction for every example."""
    examples = hellaswag_examples()
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    official = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_local.yaml").write_text(
        f"include: {official}\ntask: hellaswag_local\ndataset_path: json\ntraining_split: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {path}\n  cache_dir: {tmp_path / 'cache'}\n"
    )
    model = f"init_from=hf:{gpt2_dir / 'gpt2'}"
    ours = run_script("eval", model, "task=hellaswag", f"hellaswag.path={path}", f"out={tmp_path / 'ours.json'}")
    assert ours.returncode == 0, ours.stderr[-3000:]
    harness = run_script(
        "eval",
        model,
        "task=lm_eval",
        "lm_eval.tasks=[hellaswag_local]",
        f"lm_eval.include_path={tmp_path / 'tasks'}",
        f"out={tmp_path / 'harness.json'}",
    )
    assert harness.returncode == 0, harness.stderr[-3000:]
    hand, theirs = json.loads(ours.stdout.splitlines()[-1]), json.loads(harness.stdout.splitlines()[-1])
    assert hand["n"] == 4
    assert (hand["acc"], hand["acc_norm"]) == (
        theirs["results"]["hellaswag_local"]["acc"],
        theirs["results"]["hellaswag_local"]["acc_norm"],
    )
    per_example = [
        json.loads(line) for line in Path(f"{tmp_path / 'ours.json'}.examples.jsonl").read_text().splitlines()
    ]
    samples = samples_by_task(Path(f"{tmp_path / 'harness.json'}.examples.jsonl"))["hellaswag_local"]
    for record in per_example:
        sample = samples[record["index"]]
        assert [-s for s in record["sum_losses"]] == pytest.approx([r[0] for r in sample["filtered_resps"]], abs=1e-4)
        assert (record["pred"] == record["label"]) == sample["acc"]
        assert (record["pred_norm"] == record["label"]) == sample["acc_norm"]


def test_lm_eval_knobs_are_refused_where_they_do_nothing(tmp_path: Path) -> None:
    cases = {
        ("task=lm_eval",): "error: task=lm_eval needs tasks or a suite (e.g. lm_eval.tasks=[hellaswag,arc_easy,piqa]",
        ("suite=core_small",): "error: suite= has no effect without task=lm_eval (set task=lm_eval)",
        ("task=lm_eval", "suite=core_small", "limit=5"): "error: limit=5 has no effect without lm_eval.tasks (a suite",
        ("lm_eval.tasks=[piqa]",): "error: lm_eval.tasks=['piqa'] has no effect without task=lm_eval",
        ("task=lm_eval", "lm_eval.tasks=[piqa]", f"lm_eval.include_path={tmp_path / 'none'}"): (
            f"error: lm_eval.include_path={tmp_path / 'none'} is not a directory (give a directory of task YAML files)"
        ),
    }
    for overrides, error in cases.items():
        result = run_script("eval", "init_from=gpt2", *overrides)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(error), result.stderr


def test_without_lm_eval_one_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from hydragpt.errors import UserError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "hydragpt.harness", raising=False)
    with pytest.raises(UserError, match=r"needs EleutherAI's lm-evaluation-harness") as raised:
        import hydragpt.harness  # noqa: F401
    assert raised.value.fix == "pip install 'hydragpt[eval]' (or pip install lm-eval)"


def test_a_task_whose_dataset_cannot_be_downloaded_is_one_error_line(gpt2_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    head = TASK.format(name="hub_only", split="test", data="x.jsonl", cache=tmp_path / "cache")
    body = MULTIPLE_CHOICE.format().replace("output_type", "dataset_name: null\noutput_type")
    (tmp_path / "tasks" / "hub_only.yaml").write_text(
        head.replace("dataset_path: json", "dataset_path: nobody/no_such_dataset").replace(
            "  data_files:\n    test: x.jsonl\n", ""
        )
        + body
    )
    result = run_script(
        "eval",
        f"init_from=hf:{gpt2_dir / 'gpt2'}",
        "task=lm_eval",
        "lm_eval.tasks=[hub_only]",
        f"lm_eval.include_path={tmp_path / 'tasks'}",
        env={**os.environ, "HF_HUB_OFFLINE": "1"},  # read when the Hub's client is imported: a fresh process
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: cannot load the data of lm-eval task(s) hub_only: ")
        and "Traceback" not in result.stderr
    )
    assert last.endswith("(dataset_path: json, dataset_kwargs.data_files) under lm_eval.include_path)")


@pytest.mark.slow
def test_an_unknown_task_is_one_error_line(gpt2_dir: Path) -> None:
    result = run_script(
        "eval",
        f"init_from=hf:{gpt2_dir / 'gpt2'}",
        "task=lm_eval",
        "lm_eval.tasks=[toy_mc,no_such_task]",
        f"lm_eval.include_path={gpt2_dir / 'tasks'}",
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: lm-eval has no task no_such_task (nor under include_path={gpt2_dir / 'tasks'})")
    )


@pytest.mark.slow
def test_two_ranks_split_the_requests_and_agree_with_one(gpt2_dir: Path, tmp_path: Path) -> None:
    common = [
        f"init_from=hf:{gpt2_dir / 'gpt2'}",
        "task=lm_eval",
        "lm_eval.tasks=[toy_mc,toy_ppl,toy_gen]",
        f"lm_eval.include_path={gpt2_dir / 'tasks'}",
    ]
    one = run_script("eval", *common)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, *common, cwd=tmp_path, script="eval")
    assert two.returncode == 0, two.stderr[-3000:]
    single, split = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, two))
    assert split["n"] == single["n"]
    for task, metrics in single["results"].items():
        assert split["results"][task] == pytest.approx(metrics, rel=1e-5), task


def test_a_suite_during_training_and_from_eval_py(train_run, tmp_path: Path) -> None:
    """suite= with train.eval_suite_interval: the centred mean and each task's metric join the evaluation
    records and the log line; eval.py scores the final checkpoint's suite to the same numbers."""
    tasks = write_toy_tasks(tmp_path / "tasks")
    suite = [
        "suite=core_small",
        "suite.name=toy",
        "suite.tasks=[{task:toy_mc,metric:acc,random_baseline:0.25},{task:toy_gen,metric:exact_match,num_fewshot:1}]",
        f"suite.include_path={tasks}",
    ]
    result = train_run("train.max_iters=4", "train.eval_interval=2", "train.eval_suite_interval=4", *suite)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]
    assert [("suite/toy" in r) for r in evals] == [True, False, True]  # step 0, 2 (not a multiple of 4), 4
    final = evals[-1]
    mc, exact = final["suite/toy/toy_mc"], final["suite/toy/toy_gen"]
    assert final["suite/toy"] == pytest.approx(((mc - 0.25) / 0.75 + exact) / 2) and 0 <= exact <= 1
    assert f", toy {final['suite/toy']:.4f}" in result.stdout

    scored = run_script("eval", f"ckpt={tmp_path / 'run'}", "task=lm_eval", *suite)
    assert scored.returncode == 0, scored.stderr[-3000:]
    got = json.loads(scored.stdout.strip().splitlines()[-1])["suite"]
    assert got["metrics"] == pytest.approx({"toy_mc": mc, "toy_gen": exact}, rel=1e-6)
    assert got["score"] == pytest.approx(final["suite/toy"], rel=1e-6)


def test_a_suite_in_training_is_refused_where_it_cannot_run(train_run) -> None:
    cases = {
        ("train.eval_suite_interval=250",): "error: train.eval_suite_interval and suite= go together",
        ("suite=core_small",): "error: train.eval_suite_interval and suite= go together",
        ("suite=core_small", "train.eval_suite_interval=250", "ddp=fsdp"): (
            "error: train.eval_suite_interval cannot run under ddp=fsdp"
        ),
    }
    for overrides, error in cases.items():
        result = train_run(*overrides)
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(error), result.stderr


def test_log_likelihoods_of_an_empty_context_and_of_a_continuation_longer_than_the_block() -> None:
    """An empty context scores the continuation after the end-of-text token; a continuation longer than
    the block scores its last block_size tokens, each with the tokens before it as context."""
    import torch.nn.functional as F

    from hydragpt.data.tokenizer import CharTokenizer
    from hydragpt.errors import UserError
    from hydragpt.harness import HarnessModel
    from hydragpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    tokenizer = CharTokenizer("\n abcdefgh")
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=16, bias=True)).eval()
    lm = HarnessModel(model, tokenizer, batch_size=2)

    def reference(window: list[int], n: int) -> float:
        with torch.no_grad():
            logits, _ = model(torch.tensor([window[:-1]]))
        log_probs = F.log_softmax(logits[0, :, : tokenizer.vocab_size], dim=-1)
        targets = torch.tensor(window[1:])
        return log_probs[-n:].gather(-1, targets[-n:, None]).sum().item()

    long = tokenizer.encode("abcdefghabcdefgh")  # 16 tokens, the block is 8
    short = tokenizer.encode("ab cd")
    (empty, _), (longer, _), (plain, _) = lm._loglikelihood_tokens(
        [(None, [], short), (None, tokenizer.encode("h"), long), (None, tokenizer.encode("gh"), short)]
    )
    assert empty == pytest.approx(reference([lm.prefix_token_id, *short], len(short)), abs=1e-5)
    assert longer == pytest.approx(reference(long[-9:], 8), abs=1e-5)
    assert plain == pytest.approx(reference(tokenizer.encode("gh") + short, len(short)), abs=1e-5)
    with pytest.raises(UserError, match=r"^the model's tokenizer cannot encode a task's text: text has 1 char"):
        lm.tok_encode("abz")
