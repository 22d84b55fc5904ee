"""What `scripts/peek.py` runs: decode a stretch of a prepared split, to see what the model will read."""

from __future__ import annotations

from dataclasses import asdict

from hydragpt.config import PeekConfig
from hydragpt.data.identity import open_dataset
from hydragpt.errors import UserError


def peek(cfg: PeekConfig, data_choice: str | None = None) -> str:
    """A one-line summary of the split, then the decoded tokens [offset, offset + n_tokens). The dataset must
    have been prepared with the settings `cfg.data` gives (of `data=<data_choice>`, to name in a fix)."""
    dataset = open_dataset(data_choice, asdict(cfg.data), cfg.paths.data_dir)
    tokens = dataset.splits[cfg.split]
    if cfg.offset >= len(tokens):
        raise UserError(
            f"offset={cfg.offset} is past the end of the {cfg.split} split ({len(tokens):,} tokens)",
            f"use an offset below {len(tokens)}",
        )
    ids = tokens.read(cfg.offset, min(cfg.n_tokens, len(tokens) - cfg.offset)).tolist()
    meta = dataset.meta
    lines = [
        f"# {cfg.data.name} {cfg.split}: {len(tokens):,} tokens in {len(meta.shards[cfg.split])} shard(s), "
        f"vocab {meta.vocab_size} ({meta.dtype}); tokens {cfg.offset:,} to {cfg.offset + len(ids):,}:",
    ]
    if cfg.ids:
        lines.append(" ".join(map(str, ids)))
    lines.append(dataset.tokenizer.decode(ids))
    return "\n".join(lines)
