"""Loaders over sharded splits: reads across shard boundaries, exact resume, disjoint ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hydragpt.data.dataset import SplitTokens
from hydragpt.data.loader import RandomBatchLoader, SequentialBatchLoader, evaluation_batches
from hydragpt.errors import UserError
from tests.helpers import open_prepared, prepare_dataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory: pytest.TempPathFactory) -> SplitTokens:
    """A char dataset whose train split spans three shards (1000 + 1000 + 700 tokens)."""
    tmp = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text("".join(rng.choice(list("abcdefghij \n"), size=3000)))
    dataset = open_prepared(prepare_dataset(tmp, "shakespeare_char", tmp / "corpus.txt", "data.shard_tokens=1000"))
    assert [s["tokens"] for s in dataset.meta.shards["train"]] == [1000, 1000, 700]
    return dataset.splits["train"]


def whole(tokens: SplitTokens) -> np.ndarray:
    return np.concatenate([np.asarray(s) for s in tokens.shards]).astype(np.int64)


def test_reads_cross_shard_boundaries(three_shards: SplitTokens) -> None:
    flat = whole(three_shards)
    assert len(three_shards) == len(flat) == 2700
    assert three_shards.read(990, 25).tolist() == flat[990:1015].tolist()
    assert three_shards.read(995, 1010).tolist() == flat[995:2005].tolist()  # through all three shards
    starts = np.array([0, 990, 1999, 2000, 2690, 5])
    assert three_shards.windows(starts, 10).tolist() == [flat[s : s + 10].tolist() for s in starts]


def test_sequential_loader_tiles_every_window_once_per_epoch(three_shards: SplitTokens) -> None:
    flat, block = whole(three_shards), 16
    loader = SequentialBatchLoader(three_shards, batch_size=4, block_size=block, device=CPU)
    assert loader.n_windows == (2700 - 1) // block == 168
    seen = []
    for _ in range(168 // 4):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])
        seen.extend(x[:, 0].tolist())
    assert seen == flat[np.arange(168) * block].tolist() and loader.epoch == 1
    x, _ = loader.next_batch()  # the second epoch starts over
    assert x[0].tolist() == flat[:block].tolist()


def batches(loader: RandomBatchLoader | SequentialBatchLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_state_saved_mid_shard_restores_the_next_100_batches(three_shards: SplitTokens, sampling: str) -> None:
    """100 batches of 3 x 16 run through shard boundaries and an epoch boundary (56 batches per epoch)."""

    def make(seed: int) -> RandomBatchLoader | SequentialBatchLoader:
        if sampling == "random":
            return RandomBatchLoader(three_shards, 3, 16, seed, CPU)
        return SequentialBatchLoader(three_shards, 3, 16, CPU)

    loader = make(seed=1)
    batches(loader, 7)  # mid-shard: window 21 starts at token 336 of shard 0
    state = loader.state_dict()
    expected = batches(loader, 100)
    restored = make(seed=999)
    restored.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, batches(restored, 100), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_state_from_the_other_sampling_mode_is_refused(three_shards: SplitTokens) -> None:
    state = SequentialBatchLoader(three_shards, 3, 16, CPU).state_dict()
    with pytest.raises(UserError, match=r"used data\.sampling=sequential, not random"):
        RandomBatchLoader(three_shards, 3, 16, 0, CPU).load_state_dict(state)


def test_two_ranks_never_share_a_window_within_an_epoch(three_shards: SplitTokens) -> None:
    ranks = [SequentialBatchLoader(three_shards, 4, 16, CPU, rank=r, world_size=2) for r in (0, 1)]
    single = SequentialBatchLoader(three_shards, 8, 16, CPU)
    per_rank: list[list[int]] = [[], []]
    for _ in range(168 // 8):  # one epoch: 21 steps of 2 ranks x 4 windows
        for rank, loader in enumerate(ranks):
            per_rank[rank].extend(loader.window_indices().tolist())
            _x, _ = loader.next_batch()
        step = single.window_indices().tolist()
        assert sorted(step) == sorted(per_rank[0][-4:] + per_rank[1][-4:])  # the same global batch as 1 rank
        single.next_batch()
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(168))
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_random_ranks_take_disjoint_slices_of_one_stream(three_shards: SplitTokens) -> None:
    ranks = [RandomBatchLoader(three_shards, 4, 16, 7, CPU, rank=r, world_size=2) for r in (0, 1)]
    single = RandomBatchLoader(three_shards, 8, 16, 7, CPU)
    for _ in range(5):
        x_all, _ = single.next_batch()
        x0, _ = ranks[0].next_batch()
        x1, _ = ranks[1].next_batch()
        assert torch.equal(torch.cat([x0, x1]), x_all)


def test_sequential_loader_needs_one_step_of_windows(three_shards: SplitTokens) -> None:
    with pytest.raises(UserError, match=r"168 windows of block_size 16, fewer than one step's"):
        SequentialBatchLoader(three_shards, 100, 16, CPU, rank=0, world_size=2)


def test_memory_maps_are_opened_once(three_shards: SplitTokens) -> None:
    """Shards stay mapped for the dataset's life: batches open no files and leak no handles."""
    fds = len(list(Path("/proc/self/fd").iterdir()))
    loader = SequentialBatchLoader(three_shards, 4, 16, CPU)
    batches(loader, 500)
    assert len(list(Path("/proc/self/fd").iterdir())) == fds


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_evaluation_batches_are_dealt_evenly_and_counted_once(three_shards: SplitTokens, world_size: int) -> None:
    """Every rank runs the same number of forwards (FSDP's all-gathers need all ranks), and the counted
    batches of all ranks are exactly the single process's batches."""
    single = [x for x, _, counts in evaluation_batches(three_shards, 2, 8, 5, CPU) if counts]
    counted, per_rank = [], set()
    for rank in range(world_size):
        batches = list(evaluation_batches(three_shards, 2, 8, 5, CPU, rank, world_size))
        per_rank.add(len(batches))
        counted += [x for x, _, counts in batches if counts]
    assert per_rank == {-(-5 // world_size)} and len(single) == 5
    assert sorted(x.flatten().tolist() for x in counted) == sorted(x.flatten().tolist() for x in single)
