"""Batches on the device: training loaders (where each rank's next batch comes from, and how to resume
there) and the fixed evaluation batches.

Both loaders deal windows from one global stream that every rank computes identically: per call, the
`world_size * batch_size` next windows of the stream, of which rank r takes the r-th `batch_size`. So
ranks never draw the same stream position, and a loader's whole position is a small state that goes
into the checkpoint: a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from hydragpt.data.dataset import SplitTokens
from hydragpt.errors import UserError


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device: pinned and non-blocking on CUDA."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device_batch(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets from (n, block_size + 1) windows."""
    batch = to_device(windows, device)
    return batch[:, :-1], batch[:, 1:]


def evaluation_batches(
    tokens: SplitTokens,
    batch_size: int,
    block_size: int,
    n_batches: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """This rank's share (every world_size-th) of `n_batches` batches of windows spread evenly over the
    split, as (x, y, counts).

    The same windows at every evaluation and in every run of the same data: val losses differ only
    because the models do, and a stratified sample is a steadier estimate than random windows. Every
    rank gets the same number of batches, ceil(n_batches / world_size): a sharded model (FSDP) gathers
    its weights in each forward, a collective that all ranks must join. The ranks short of a batch repeat
    their first one (or the split's) with `counts` False, to be left out of the loss.
    """
    starts = np.linspace(0, len(tokens) - block_size - 1, n_batches * batch_size).astype(np.int64)
    batches = starts.reshape(n_batches, batch_size)
    mine = batches[rank::world_size]
    for i in range(-(-n_batches // world_size)):
        counts = i < len(mine)
        batch_starts = mine[i] if counts else (mine[0] if len(mine) else batches[0])
        x, y = to_device_batch(tokens.windows(batch_starts, block_size + 1), device)
        yield x, y, counts


class BatchLoader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _WindowLoader:
    """What both loaders share: the split, the batch shape, and this rank's place among all ranks."""

    def __init__(
        self, tokens: SplitTokens, batch_size: int, block_size: int, device: torch.device, rank: int, world_size: int
    ) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.rank = rank
        self.world_size = world_size

    def _batch(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets of the windows at `starts`, each (batch_size, block_size) int64."""
        return to_device_batch(self.tokens.windows(starts, self.block_size + 1), self.device)


class RandomBatchLoader(_WindowLoader):
    """Windows at uniformly random positions of the split, as nanoGPT samples them (cheap, no epochs).

    The positions come from the loader's own seeded generator, not the global RNG, and every rank draws
    the whole global batch and keeps its own slice, so the ranks' generators stay in step.
    """

    def __init__(
        self,
        tokens: SplitTokens,
        batch_size: int,
        block_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(tokens, batch_size, block_size, device, rank, world_size)
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.world_size * self.batch_size
        starts = torch.randint(len(self.tokens) - self.block_size, (n,), generator=self.generator).numpy()
        return self._batch(starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict[str, Any]:
        return {"sampling": "random", "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_sampling(state, "random")
        self.generator.set_state(state["generator"])


class SequentialBatchLoader(_WindowLoader):
    """Every window of the split exactly once per epoch, in order, across shard boundaries.

    Window k holds tokens [k * block_size, (k + 1) * block_size + 1): consecutive windows tile the split
    (build-nanogpt's layout). The position is the number of windows dealt so far to all ranks together;
    window `position mod n_windows` comes next, and `position // n_windows` is the epoch.
    """

    def __init__(
        self,
        tokens: SplitTokens,
        batch_size: int,
        block_size: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        block_knob: str = "model.block_size",
    ) -> None:
        super().__init__(tokens, batch_size, block_size, device, rank, world_size)
        self.n_windows = (len(tokens) - 1) // block_size
        if self.n_windows < world_size * batch_size:
            raise UserError(
                f"the training split has {self.n_windows} windows of block_size {block_size}, fewer than one "
                f"step's batch_size x world_size = {batch_size} x {world_size}",
                f"use a smaller train.batch_size or {block_knob}, a larger corpus, or data.sampling=random",
            )
        self.position = 0

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    def window_indices(self) -> np.ndarray:
        """The windows (within the epoch) of this rank's next batch."""
        first = self.position + self.rank * self.batch_size
        return (first + np.arange(self.batch_size)) % self.n_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.window_indices() * self.block_size
        self.position += self.world_size * self.batch_size
        return self._batch(starts)

    def state_dict(self) -> dict[str, Any]:
        return {"sampling": "sequential", "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_sampling(state, "sequential")
        self.position = state["position"]


def _check_sampling(state: dict[str, Any], expected: str) -> None:
    saved = state.get("sampling", "random")  # checkpoints from before sequential sampling existed
    if saved != expected:
        raise UserError(
            f"the checkpoint's data loader used data.sampling={saved}, not {expected}",
            f"resume with data.sampling={saved}",
        )


def build_train_loader(
    sampling: str,
    tokens: SplitTokens,
    batch_size: int,
    block_size: int,
    seed: int,
    device: torch.device,
    rank: int,
    world_size: int,
    block_knob: str = "model.block_size",
) -> BatchLoader:
    """The training loader for `data.sampling`, dealing rank `rank`'s share of each global batch;
    `block_knob` is the setting that shortens the block, named when the data is too short for it."""
    if sampling == "random":
        return RandomBatchLoader(tokens, batch_size, block_size, seed, device, rank, world_size)
    return SequentialBatchLoader(tokens, batch_size, block_size, device, rank, world_size, block_knob)


class Prefetcher:
    """Wraps a loader so that the next batch can be drawn (and, on CUDA, copied) while the current step
    still runs; its position is the wrapped loader's before the batch drawn ahead, so a checkpoint taken
    between steps resumes with exactly that batch."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader
        self._ahead: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state_before_ahead: dict[str, Any] = {}

    def prefetch(self) -> None:
        if self._ahead is None:
            self._state_before_ahead = self.loader.state_dict()
            self._ahead = self.loader.next_batch()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.prefetch()
        assert self._ahead is not None
        batch, self._ahead = self._ahead, None
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self._state_before_ahead if self._ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)
