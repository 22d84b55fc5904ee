"""What the Trainer measures at each evaluation: each evaluator returns named numbers for the record.

- `SplitLoss`: the mean loss over `eval_iters` fixed batches of each split (the same windows every time;
  a chat dataset's packed rows, scored on the assistant's replies only), and its bits per byte
  (`bits_per_byte`), which compares models across tokenizers.
- `HellaswagAccuracy`: HellaSwag acc and acc_norm, at the evaluations whose step is a multiple of its interval.
- `SuiteScore`: a benchmark suite through lm-eval (conf/suite/), at the evaluations whose step is a multiple
  of its interval: the suite's centred mean as `suite/<name>`, each task's metric as `suite/<name>/<task>`.
- `TextSamples`: a continuation of a fixed prompt, written to samples/iter_<step>.txt and the log, so a run
  shows what its model says as it learns; it adds no numbers.

Each runs on every rank with the model in eval mode: the losses take a share each and all-reduce the sums;
sampling runs on every rank in lockstep, which FSDP's sharded forward needs, and rank 0 writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hydragpt.config import SampleConfig, SuiteConfig
from hydragpt.data.chat_batches import chat_evaluation_batches
from hydragpt.data.dataset import SPLITS, TokenDataset
from hydragpt.data.loader import evaluation_batches
from hydragpt.data.tokenizer import Tokenizer, encode_prompt
from hydragpt.engine.distributed import DistEnv, all_reduce
from hydragpt.engine.metrics import bits_per_byte, scored_targets
from hydragpt.engine.system import autocast
from hydragpt.evaluation import hellaswag_scores
from hydragpt.model import GPT
from hydragpt.sampling import Settings, complete

log = logging.getLogger("hydragpt.train")


class Evaluator(Protocol):
    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]: ...


def due(step: int, interval: int, final: bool) -> bool:
    """An evaluator with its own interval runs at the evaluations whose step is a multiple of it, and the last."""
    return step % interval == 0 or final


@dataclass
class SplitLoss:
    data: TokenDataset
    batch_size: int
    block_size: int
    eval_iters: int
    device: torch.device
    dtype: torch.dtype
    env: DistEnv
    token_bytes: torch.Tensor  # per token id, the UTF-8 bytes it stands for (Tokenizer.token_bytes)

    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        losses = {}
        for split in SPLITS:
            total = torch.zeros((), device=self.device)
            n_targets = torch.zeros((), dtype=torch.long, device=self.device)
            n_bytes = torch.zeros((), dtype=torch.long, device=self.device)
            for x, y, counts in self._batches(split):
                with autocast(self.device, self.dtype):
                    _, loss = model(x, y, reduction="sum")
                if counts:
                    scored, scored_bytes = scored_targets(y, self.token_bytes)
                    total += loss.float()
                    n_targets += scored
                    n_bytes += scored_bytes
            nats = all_reduce(total, "sum").item()
            losses[f"{split}_loss"] = nats / max(all_reduce(n_targets, "sum").item(), 1)
            losses[f"{split}_bpb"] = bits_per_byte(nats, int(all_reduce(n_bytes, "sum").item()))
        return losses

    def _batches(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        shape = (self.batch_size, self.block_size, self.eval_iters, self.device, self.env.rank, self.env.world_size)
        if self.data.chat:
            return chat_evaluation_batches(self.data.conversations(split), *shape)
        return evaluation_batches(self.data.splits[split], *shape)


@dataclass
class HellaswagAccuracy:
    examples: list[dict[str, Any]]
    method: str  # hellaswag.method
    tokenizer: Tokenizer
    interval: int
    device: torch.device
    dtype: torch.dtype
    env: DistEnv

    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        if not due(step, self.interval, final):
            return {}
        with autocast(self.device, self.dtype):
            scores, _ = hellaswag_scores(model, self.tokenizer, self.examples, self.method, self.env, progress=False)
        return {"hellaswag_acc": scores["acc"], "hellaswag_acc_norm": scores["acc_norm"]}


@dataclass
class SuiteScore:
    """lm-eval splits the requests over the ranks and gathers the answers on rank 0, which alone has the
    numbers; the bare model runs them, since their shapes vary from request to request."""

    model: GPT
    suite: SuiteConfig
    tokenizer: Tokenizer
    batch_size: int
    interval: int
    dtype: torch.dtype

    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        if not due(step, self.interval, final):
            return {}
        from hydragpt.harness import HarnessModel, score_suite

        # the adapter runs its forwards in `dtype` itself
        score, _ = score_suite(HarnessModel(self.model, self.tokenizer, self.batch_size, self.dtype), self.suite, 0)
        if not score:  # ranks other than 0
            return {}
        name = f"suite/{self.suite.name}"
        return {name: score["score"], **{f"{name}/{task}": value for task, value in score["metrics"].items()}}


@dataclass
class TextSamples:
    """Sampling settings are sample.py's defaults (SampleConfig's temperature, top_k, top_p) with a generator
    seeded the same at every evaluation: the same prompt and seed show how one model's answer changes, and
    the training RNG is left untouched, so a run with samples trains exactly like one without."""

    model: GPT  # the bare model: generation grows its context one token at a time, which compiling would chase
    tokenizer: Tokenizer
    prompt: str
    max_new_tokens: int
    interval: int
    seed: int
    out_dir: Path
    device: torch.device
    dtype: torch.dtype
    env: DistEnv
    prompt_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_ids = encode_prompt(self.tokenizer, self.prompt, "train.sample_start")  # before training

    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        if not due(step, self.interval, final):
            return {}
        defaults = SampleConfig
        settings = Settings(self.max_new_tokens, defaults.temperature, defaults.top_k, defaults.top_p, [], True)
        generator = torch.Generator(self.device).manual_seed(self.seed)
        (text,) = complete(self.model, self.tokenizer, [self.prompt_ids], settings, generator, self.dtype)
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"iter_{step:06d}.txt").write_text(self.prompt + text, encoding="utf-8")
            log.info("sample at iter %d:\n%s%s", step, self.prompt, text)
        return {}
