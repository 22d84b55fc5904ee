"""Batches of a chat dataset: whole conversations packed into rows, with targets only where the mask says.

A chat dataset's split is a stream of documents, each starting with <|bos|> (see chat.py), and a loss mask
beside it. A training row holds block_size + 1 tokens: documents are laid into rows whole, each into the
first of the last few rows with room, and what no document fills is padding. So every reply is seen with
its conversation from the start, and no row starts mid-sentence. A document longer than the row (a single
turn longer than the block) is cut at the row's end. Targets are the next tokens where the mask is 1 and
-1 elsewhere, which the model's loss ignores: user messages, the template's tokens and padding are
context, never learned.

The loader deals rows as the window loaders deal windows: per call, the `world_size * batch_size` next rows
of one packing that every rank computes alike, of which rank r takes the r-th `batch_size`; its position
(epoch and row) is its whole state, so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hydragpt.data.dataset import SplitTokens
from hydragpt.data.loader import to_device
from hydragpt.errors import UserError

IGNORE = -1  # the target the model's loss skips (GPT.forward's ignore_index)
READ_CHUNK = 1 << 24  # tokens scanned at a time for document starts
OPEN_ROWS = 16  # rows a packing keeps filling: more pads less, but packs slower


class Conversations:
    """One split of a chat dataset: its tokens, their loss mask, and where each document starts."""

    def __init__(self, tokens: SplitTokens, mask: SplitTokens, bos: int) -> None:
        self.tokens, self.mask, self.bos = tokens, mask, bos
        found = [
            start + np.flatnonzero(tokens.read(start, min(READ_CHUNK, len(tokens) - start)) == bos)
            for start in range(0, len(tokens), READ_CHUNK)
        ]
        self.starts = np.concatenate([np.empty(0, np.int64), *found])
        if len(tokens) and (not len(self.starts) or self.starts[0] != 0):
            raise UserError("a chat dataset's split does not start with <|bos|>", "prepare it again with data=chat")
        self.lengths = np.diff(np.append(self.starts, len(tokens)))
        self._in_order: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def in_order(self, row_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """`pack` of the documents in their order, made once: evaluation and sequential sampling read it
        again and again."""
        if row_tokens not in self._in_order:
            self._in_order[row_tokens] = self.pack(np.arange(len(self)), row_tokens)
        return self._in_order[row_tokens]

    def pack(self, order: np.ndarray, row_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Documents (taken in `order`) laid into rows of `row_tokens`: each goes into the first of the
        OPEN_ROWS newest rows it fits in, else starts a row. Returns the documents row by row, and the row
        boundaries in that list: row k holds packed[bounds[k]:bounds[k + 1]]."""
        rows: list[list[int]] = []
        filled: list[int] = []
        open_rows: list[int] = []
        for doc, length in zip(order.tolist(), np.minimum(self.lengths[order], row_tokens).tolist(), strict=True):
            for k, row in enumerate(open_rows):
                if filled[row] + length <= row_tokens:
                    rows[row].append(doc)
                    filled[row] += length
                    if filled[row] == row_tokens:
                        open_rows.pop(k)
                    break
            else:
                rows.append([doc])
                filled.append(length)
                if length < row_tokens:
                    open_rows = [*open_rows[-OPEN_ROWS + 1 :], len(rows) - 1]
        packed = np.array([doc for row in rows for doc in row], dtype=np.int64)
        return packed, np.cumsum([0] + [len(row) for row in rows])

    def rows(self, documents: list[np.ndarray], row_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, targets) of rows of `row_tokens`, one per list of documents: inputs are the first
        row_tokens - 1, targets the next token where the mask is 1, else IGNORE."""
        tokens = np.full((len(documents), row_tokens), self.bos, dtype=np.int64)
        mask = np.zeros((len(documents), row_tokens), dtype=bool)
        for row, docs in enumerate(documents):
            filled = 0
            for doc in docs.tolist():
                length = min(int(self.lengths[doc]), row_tokens - filled)
                start = int(self.starts[doc])
                tokens[row, filled : filled + length] = self.tokens.read(start, length)
                mask[row, filled : filled + length] = self.mask.read(start, length) > 0
                filled += length
        targets = np.where(mask[:, 1:], tokens[:, 1:], IGNORE)
        return tokens[:, :-1], targets


def _to_device(rows: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    both = to_device(np.stack(rows), device)  # one copy for inputs and targets
    return both[0], both[1]


class ChatBatchLoader:
    """Rows of packed conversations, every conversation once per epoch: in the dataset's order
    (data.sampling=sequential), or in a new seeded order each epoch (random)."""

    def __init__(
        self,
        conversations: Conversations,
        batch_size: int,
        block_size: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data, self.batch_size, self.row_tokens = conversations, batch_size, block_size + 1
        self.shuffle, self.seed, self.device = shuffle, seed, device
        self.rank, self.world_size = rank, world_size
        self.epoch, self.row = 0, 0
        self._packed: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, documents by row, bounds)
        self.n_windows = len(self._packing(0)[1]) - 1  # rows in an epoch (the first; shuffled ones differ a little)

    def _packing(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.shuffle:
            return self.data.in_order(self.row_tokens)
        if self._packed is None or self._packed[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._packed = (epoch, *self.data.pack(order, self.row_tokens))
        return self._packed[1], self._packed[2]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        documents = []
        for _ in range(self.world_size * self.batch_size):
            packed, bounds = self._packing(self.epoch)
            documents.append(packed[bounds[self.row] : bounds[self.row + 1]])
            self.row += 1
            if self.row == len(bounds) - 1:
                self.epoch, self.row = self.epoch + 1, 0
        mine = documents[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _to_device(self.data.rows(mine, self.row_tokens), self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"sampling": self._sampling, "epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sampling") != self._sampling:
            raise UserError(
                f"the checkpoint's data loader dealt {state.get('sampling')} batches, not {self._sampling}",
                "resume with the data and data.sampling the run started with",
            )
        self.epoch, self.row = state["epoch"], state["row"]

    @property
    def _sampling(self) -> str:
        return "chat_random" if self.shuffle else "chat_sequential"


def chat_evaluation_batches(
    conversations: Conversations,
    batch_size: int,
    block_size: int,
    n_batches: int | None,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    limit: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """This rank's share of the split's rows (packed in order) as (x, y, counts), like evaluation_batches:
    `n_batches` batches of rows spread evenly over the split (the same rows every time), or with None every
    row once (the first `limit` rows). Ranks short of a batch repeat a row with `counts` False."""
    packed, bounds = conversations.in_order(block_size + 1)
    n_rows = len(bounds) - 1
    if n_batches is None:
        picked = np.arange(min(n_rows, limit or n_rows))
    else:
        picked = np.linspace(0, n_rows - 1, n_batches * batch_size).round().astype(np.int64)
    batches = [picked[i : i + batch_size] for i in range(0, len(picked), batch_size)]
    mine = batches[rank::world_size]
    for i in range(-(-len(batches) // world_size)):
        counts = i < len(mine)
        rows = mine[i] if counts else (mine[0] if mine else batches[0])  # a batch's shape: no new compile
        documents = [packed[bounds[r] : bounds[r + 1]] for r in rows.tolist()]
        yield (*_to_device(conversations.rows(documents, block_size + 1), device), counts)
