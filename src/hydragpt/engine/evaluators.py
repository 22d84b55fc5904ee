"""What the Trainer measures at each evaluation: each evaluator returns named numbers for the record.

- `SplitLoss`: the mean loss over `eval_iters` fixed batches of each split (the same windows every time).
- `HellaswagAccuracy`: HellaSwag acc and acc_norm, at the evaluations whose step is a multiple of its interval.

Both run on every rank (each takes its share and the sums are all-reduced) with the model in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from hydragpt.data.dataset import SPLITS, TokenDataset
from hydragpt.data.loader import evaluation_batches
from hydragpt.data.tokenizer import Tokenizer
from hydragpt.engine.distributed import DistEnv, all_reduce
from hydragpt.engine.system import autocast
from hydragpt.evaluation import hellaswag_scores


class Evaluator(Protocol):
    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]: ...


@dataclass
class SplitLoss:
    data: TokenDataset
    batch_size: int
    block_size: int
    eval_iters: int
    device: torch.device
    dtype: torch.dtype
    env: DistEnv

    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        losses = {}
        for split in SPLITS:
            batches = evaluation_batches(
                self.data.splits[split],
                self.batch_size,
                self.block_size,
                self.eval_iters,
                self.device,
                self.env.rank,
                self.env.world_size,
            )
            total = torch.zeros((), device=self.device)
            for x, y, counts in batches:
                with autocast(self.device, self.dtype):
                    _, loss = model(x, y)
                if counts:
                    total += loss.float()
            losses[f"{split}_loss"] = (all_reduce(total, "sum") / self.eval_iters).item()
        return losses


@dataclass
class HellaswagAccuracy:
    examples: list[dict[str, Any]]
    tokenizer: Tokenizer
    interval: int
    device: torch.device
    dtype: torch.dtype
    env: DistEnv

    def __call__(self, model: nn.Module, step: int, final: bool) -> dict[str, float]:
        if step % self.interval and not final:
            return {}
        with autocast(self.device, self.dtype):
            scores, _ = hellaswag_scores(model, self.tokenizer, self.examples, self.env, progress=False)
        return {"hellaswag_acc": scores["acc"], "hellaswag_acc_norm": scores["acc_norm"]}
