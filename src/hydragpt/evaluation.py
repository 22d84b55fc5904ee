"""What `scripts/eval.py` runs: a checkpoint's loss over a whole split, its HellaSwag accuracy, or
lm-evaluation-harness tasks and suites (through hydragpt.harness).

Under torchrun each rank scores its share (every world_size-th window or example) and the sums are
all-reduced, so the result is the same on any number of ranks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hydragpt.config import DataConfig, EvalConfig, HellaswagConfig
from hydragpt.data.chat_batches import chat_evaluation_batches
from hydragpt.data.dataset import PrepareCommand, SplitTokens, TokenDataset
from hydragpt.data.identity import command_for, open_dataset, other_data
from hydragpt.data.loader import to_device_batch
from hydragpt.data.tokenizer import CHAR, Tokenizer
from hydragpt.engine import distributed
from hydragpt.engine.metrics import bits_per_byte, scored_targets
from hydragpt.engine.parallel import DataParallel
from hydragpt.engine.system import autocast, resolve_device, resolve_dtype
from hydragpt.errors import UserError
from hydragpt.model import GPT
from hydragpt.sampling import load_model, load_source

log = logging.getLogger("hydragpt.eval")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Score the checkpoint; prints the result as one JSON object (the last stdout line) and returns it."""
    env = distributed.launched_env()
    DataParallel().setup(env, cfg.device)  # under torchrun: each rank scores its share
    try:
        if cfg.out and env.is_main:  # now, not after the work: a path that cannot be made fails first
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        ckpt, name = load_source(cfg.ckpt, cfg.init_from, Path(cfg.paths.output_dir))
        device = resolve_device(cfg.device, env.local_rank if env.is_distributed else None, key="device")
        dtype = resolve_dtype(cfg.dtype, device)
        model, tokenizer = load_model(ckpt, device)
        log.info("evaluating %s on %s: %s", name, device, cfg.task)
        with torch.no_grad(), autocast(device, dtype):
            if cfg.task == "val_loss":
                token_bytes = torch.from_numpy(tokenizer.token_bytes()).to(device)
                result = split_loss(model, dataset_to_score(cfg, ckpt), token_bytes, cfg, env)
            elif cfg.task == "hellaswag":
                result = hellaswag(model, tokenizer, cfg, env)
            else:
                result = lm_eval_tasks(model, tokenizer, cfg, dtype)
        if env.is_main:
            print(json.dumps(result), flush=True)
            if cfg.out:
                Path(cfg.out).write_text(json.dumps(result) + "\n")
        return result
    finally:
        distributed.shutdown()


def lm_eval_tasks(model: GPT, tokenizer: Tokenizer, cfg: EvalConfig, dtype: torch.dtype) -> dict[str, Any]:
    """lm-eval's tasks and the suite through our model: its tables on stdout (rank 0), each task's metrics
    and the suite's score as the result, and every example's request, answers and scores beside `out`."""
    from hydragpt.harness import HarnessModel, evaluate_tasks, score_suite, summary, table

    lm = HarnessModel(model, tokenizer, cfg.batch_size, dtype)
    options = cfg.lm_eval
    runs = []
    if options.tasks:
        runs.append(
            evaluate_tasks(
                lm, options.tasks, options.num_fewshot, cfg.limit, options.include_path, options.bootstrap_iters
            )
        )
    suite, suite_runs = score_suite(lm, cfg.suite, options.bootstrap_iters) if cfg.suite else ({}, [])
    runs = [r for r in runs + suite_runs if r is not None]
    if not runs:  # ranks other than 0
        return {}
    for results in runs:
        print(table(results), flush=True)
    if cfg.out:
        records = [{"task": t, **s} for results in runs for t, samples in results["samples"].items() for s in samples]
        Path(f"{cfg.out}.examples.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    result: dict[str, Any] = {
        "task": "lm_eval",
        "results": {task: metrics for results in runs for task, metrics in summary(results).items()},
        "n": {task: n["effective"] for results in runs for task, n in results["n-samples"].items()},
    }
    if suite:
        print(f"{suite['name']}: {suite['score']:.4f} (mean of {len(suite['centred'])} centred scores)", flush=True)
        result["suite"] = suite
    return result


def dataset_to_score(cfg: EvalConfig, ckpt: dict[str, Any]) -> TokenDataset:
    """The checkpoint's own dataset (`dataset=null`), which must hold the very tokens it trained on, or the
    one `dataset=` names, which must have the model's tokenizer."""
    own = ckpt["config"]["data"] if "config" in ckpt else None  # none for a pretrained import
    if cfg.dataset is None and own is None:
        raise UserError("a pretrained model has no dataset of its own", "give dataset=<prepared dataset>")
    if cfg.dataset is None:
        data = open_dataset(ckpt["config_choices"].get("data"), own, cfg.paths.data_dir, compare=False)
        if difference := other_data(ckpt.get("data"), data.meta):
            raise UserError(
                f"{data.dir} holds other data than the checkpoint trained on ({difference})",
                f"dataset={own['name']} scores it anyway; or point paths.data_dir at the data the run trained on",
            )
        return data
    data = TokenDataset(Path(cfg.paths.data_dir) / cfg.dataset, _command_for_named(cfg, ckpt, own))
    if data.meta.tokenizer != ckpt["tokenizer"]:
        trained_on = f", e.g. dataset={own['name']}, the one it trained on" if own else ""
        raise UserError(
            f"dataset '{cfg.dataset}' was prepared with another tokenizer than the model's",
            f"give dataset=<a dataset prepared with the model's tokenizer>{trained_on}",
        )
    return data


def _command_for_named(cfg: EvalConfig, ckpt: dict[str, Any], own: dict[str, Any] | None) -> PrepareCommand:
    """How to prepare the dataset `dataset=` names: the checkpoint's own way if it is its own, else as a
    corpus of one's own with the model's tokenizer."""
    if own is not None and own["name"] == cfg.dataset:
        return command_for(ckpt["config_choices"].get("data"), own, cfg.paths.data_dir)
    tokenizer = ckpt["tokenizer"].get("name", CHAR)  # a tiktoken encoding's name, or char
    return command_for(
        "text", {**asdict(DataConfig()), "name": cfg.dataset, "tokenizer": tokenizer}, cfg.paths.data_dir
    )


def split_loss(
    model: GPT, data: TokenDataset, token_bytes: torch.Tensor, cfg: EvalConfig, env: distributed.DistEnv
) -> dict[str, Any]:
    """Mean next-token loss over every token of the split: consecutive block_size windows, each token
    predicted once (the first token of the split has no context and is not scored); and that loss in bits
    per byte of the predicted tokens' text (`token_bytes`: UTF-8 bytes per token id). A chat dataset's
    conversations are scored in packed rows, on the assistant's replies only (`limit`: rows)."""
    block = model.config.block_size
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    count = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    n_bytes = torch.zeros((), dtype=torch.long, device=device)
    batches, n_batches = _batches(data, block, cfg, env, device)
    for x, y in tqdm(batches, total=n_batches, desc=f"{cfg.split} loss", unit="batch", disable=not env.is_main):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
        scored, scored_bytes = scored_targets(y, token_bytes)
        total += loss.to(total.dtype)
        count += scored
        n_bytes += scored_bytes
    for tensor in (total, count, n_bytes):
        distributed.all_reduce(tensor, "sum")
    if count.item() == 0:
        raise UserError(f"the {cfg.split} split has no token to predict", "prepare the dataset with more text")
    loss = (total / count).item()
    return {
        "task": "val_loss",
        "split": cfg.split,
        "n_tokens": int(count.item()),
        "n_bytes": int(n_bytes.item()),
        "loss": loss,
        "ppl": math.exp(loss),
        "bpb": bits_per_byte(total.item(), int(n_bytes.item())),
    }


def _batches(
    data: TokenDataset, block: int, cfg: EvalConfig, env: distributed.DistEnv, device: torch.device
) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int | None]:
    """This rank's batches of the split (chat rows, or windows tiling it), and how many, when known."""
    if data.chat:
        rows = chat_evaluation_batches(
            data.conversations(cfg.split), cfg.batch_size, block, None, device, env.rank, env.world_size, cfg.limit
        )
        return ((x, y) for x, y, counts in rows if counts), None
    tokens = data.splits[cfg.split]
    starts = np.arange(0, len(tokens) - 1, block, dtype=np.int64)
    if cfg.limit is not None:
        starts = starts[: cfg.limit]
    mine = starts[env.rank :: env.world_size]
    groups = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    return (batch for group in groups for batch in _windows(tokens, group, block, device)), len(groups)


def _windows(
    tokens: SplitTokens, starts: np.ndarray, block: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) for the windows at `starts`: the full ones as one batch, a short last one alone."""
    for start in starts[starts + block + 1 > len(tokens)]:
        yield to_device_batch(tokens.read(int(start), len(tokens) - int(start))[None, :].astype(np.int64), device)
    full = starts[starts + block + 1 <= len(tokens)]
    if len(full):
        yield to_device_batch(tokens.windows(full, block + 1), device)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Float64 for sums over millions of tokens, except on Apple's MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass
class Scored:
    """One HellaSwag example: each ending's summed loss and its loss normalised by the ending's length
    (characters or tokens, by method), and what they predict."""

    index: int
    label: int
    split_type: str
    sum_losses: list[float]
    norm_losses: list[float]

    @property
    def pred(self) -> int:
        return int(np.argmin(self.sum_losses))

    @property
    def pred_norm(self) -> int:
        return int(np.argmin(self.norm_losses))

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "pred": self.pred, "pred_norm": self.pred_norm}


def hellaswag(model: GPT, tokenizer: Tokenizer, cfg: EvalConfig, env: distributed.DistEnv) -> dict[str, Any]:
    """scripts/eval.py task=hellaswag: the scores, worked examples on request, and every example's
    scores as JSON lines beside `out`."""
    examples = load_hellaswag(cfg.hellaswag, env)[: cfg.limit]
    result, scored = hellaswag_scores(model, tokenizer, examples, cfg.hellaswag.method, env, progress=True)
    if env.is_main and cfg.show_examples:
        for s in scored[: cfg.show_examples]:
            _show(hellaswag_texts(examples[s.index], cfg.hellaswag.method), s, cfg.hellaswag.method)
    if cfg.out:  # every rank's scores, in example order
        gathered = distributed.gather_objects([s.record() for s in scored])
        records = sorted((r for rank in gathered for r in rank), key=lambda r: r["index"])
        if env.is_main:
            Path(f"{cfg.out}.examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return result


def hellaswag_scores(
    model: GPT,
    tokenizer: Tokenizer,
    examples: list[dict[str, Any]],
    method: str,
    env: distributed.DistEnv,
    progress: bool,
) -> tuple[dict[str, Any], list[Scored]]:
    """Context + each ending in one batch of 4, loss over the ending's tokens only; `acc` picks the lowest
    summed loss, `acc_norm` the lowest loss per character of the ending (method lm_eval) or per token
    (build_nanogpt). Each rank scores every world_size-th example; all run the same number of forwards (a
    sharded model gathers its weights in each), the ranks short of one scoring a repeat that does not
    count. Returns this rank's scores too."""
    device = next(model.parameters()).device
    mine = list(range(env.rank, len(examples), env.world_size))
    scored = []
    for k in tqdm(range(-(-len(examples) // env.world_size)), desc="hellaswag", disable=not (progress and env.is_main)):
        i = mine[k] if k < len(mine) else 0
        s = score_example(model, tokenizer, examples[i], i, method, device)
        if k < len(mine):
            scored.append(s)
    rows = [[0.0, 0.0, 0.0] for _ in range(3)]  # all, zeroshot, indomain: examples, correct, correct_norm
    for s in scored:
        for row in (0, 1 if s.split_type == "zeroshot" else 2):
            rows[row] = [rows[row][0] + 1, rows[row][1] + (s.pred == s.label), rows[row][2] + (s.pred_norm == s.label)]
    counts = distributed.all_reduce(torch.tensor(rows, dtype=accumulator_dtype(device), device=device), "sum")
    n, correct, correct_norm = counts[0].tolist()
    result: dict[str, Any] = {"task": "hellaswag", "n": int(n), "acc": correct / n, "acc_norm": correct_norm / n}
    for row, split_type in ((1, "zeroshot"), (2, "indomain")):
        if counts[row, 0] > 0:
            result[f"acc_norm_{split_type}"] = (counts[row, 2] / counts[row, 0]).item()
    return result, scored


def hellaswag_texts(example: dict[str, Any], method: str) -> tuple[str, list[str]]:
    """The context and the 4 endings as each method reads them. lm-eval's: the activity label, then ctx_a
    and ctx_b (capitalised), with the WikiHow markup ([title], [step] and the like) cleaned out of both
    context and endings; build-nanogpt's: the file's `ctx` and endings as they are."""
    if method == "build_nanogpt":
        return example["ctx"], list(example["endings"])
    context = f"{example['activity_label']}: {example['ctx_a']} {example['ctx_b'].capitalize()}"
    return _clean_wikihow(context), [_clean_wikihow(ending) for ending in example["endings"]]


def _clean_wikihow(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def score_example(
    model: GPT, tokenizer: Tokenizer, example: dict[str, Any], index: int, method: str, device: torch.device
) -> Scored:
    context_text, endings_text = hellaswag_texts(example, method)
    context = tokenizer.encode(context_text)
    if method == "lm_eval":  # an ending's tokens: those of the whole text after the context's
        endings = [tokenizer.encode(f"{context_text} {ending}")[len(context) :] for ending in endings_text]
    else:
        endings = [tokenizer.encode(f" {ending}") for ending in endings_text]
    block = model.config.block_size
    rows = []
    for ending in endings:
        row = (context + ending)[-(block + 1) :]  # a context too long for the model keeps its end (as lm-eval's)
        rows.append((row, min(len(ending), len(row) - 1)))
    width = max(len(r) for r, _ in rows)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, n_ending) in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row)
        mask[i, len(row) - n_ending : len(row)] = True
    idx, mask = idx.to(device), mask.to(device)
    logits, _ = model(idx[:, :-1])
    losses = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].flatten(), reduction="none")
    sums = (losses.view(len(rows), width - 1) * mask[:, 1:]).sum(dim=1)
    lengths = [len(e) for e in endings_text] if method == "lm_eval" else mask[:, 1:].sum(dim=1).tolist()
    norms = [total / max(1, length) for total, length in zip(sums.tolist(), lengths, strict=True)]
    return Scored(index, int(example["label"]), example.get("split_type", ""), sums.tolist(), norms)


def load_hellaswag(cfg: HellaswagConfig, env: distributed.DistEnv) -> list[dict[str, Any]]:
    """The examples on every rank: rank 0 reads (or downloads) the file, the others get its examples,
    so no two processes download to one place."""
    examples = read_hellaswag(Path(cfg.path), cfg.url) if env.is_main else None
    return distributed.broadcast_object(examples)


def read_hellaswag(path: Path, url: str) -> list[dict[str, Any]]:
    """The official jsonl (one example per line: activity_label, ctx_a, ctx_b, ctx, endings, label,
    split_type), downloaded when absent."""
    official = (
        f"point hellaswag.path at the official hellaswag_val.jsonl (activity_label, ctx_a, ctx_b, ctx, 4 endings"
        f" and a label per line), or"
        f" delete {path} to download it again from hellaswag.url"
    )
    if path.is_dir():
        raise UserError(f"hellaswag.path={path} is a directory", "point it at the official hellaswag_val.jsonl")
    if not path.is_file():
        log.info("downloading %s to %s", url, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as ex:
            raise UserError(
                f"cannot download HellaSwag from {url}: {ex}",
                f"place the official hellaswag_val.jsonl at {path} (or point hellaswag.path at it)",
            ) from ex
        tmp.replace(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as ex:
        raise UserError(f"{path} is not UTF-8 text", official) from ex
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            example = json.loads(line)
            assert all(isinstance(example[key], str) for key in ("activity_label", "ctx_a", "ctx_b", "ctx"))
            assert len(example["endings"]) == 4 and 0 <= int(example["label"]) < 4
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as ex:
            raise UserError(f"{path}:{number} is not a HellaSwag example ({type(ex).__name__})", official) from ex
        examples.append(example)
    if not examples:
        raise UserError(f"{path} holds no examples", official)
    return examples


def _show(texts: tuple[str, list[str]], scored: Scored, method: str) -> None:
    context, endings = texts
    unit = "character" if method == "lm_eval" else "token"
    print(f"context: {context}")
    for i, ending in enumerate(endings):
        print(f"  {i} (loss {scored.norm_losses[i]:.4f} per {unit}, {scored.sum_losses[i]:.2f} in all): {ending}")
    print(f"predicted {scored.pred_norm}, label {scored.label}")
