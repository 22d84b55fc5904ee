"""Training a byte-level BPE tokenizer of one's own: Hugging Face's Rust trainer (`tokenizers`) learns the
merges with GPT-4's split pattern; the result becomes a tiktoken encoding (fast to encode), described by
a plain dict that datasets and checkpoints carry (see tokenizer.BpeTokenizer).

A byte-level BPE starts from the 256 byte values (ranks 0-255, by value) and adds one token per merge,
in the order the trainer learned them (ranks 256, 257, ...): exactly what tiktoken's encoder expects.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hydragpt.config import TrainTokenizerConfig
from hydragpt.data.tokenizer import CHAT_TOKENS
from hydragpt.errors import UserError

log = logging.getLogger("hydragpt.tokenizer")

TASK_BYTES = 1 << 20  # text read per step

# GPT-4's pre-tokenization (cl100k_base): contractions, words with a leading non-letter, numbers of at
# most three digits, punctuation runs, newlines, spaces. Merges never cross these pieces.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def _byte_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte value (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def train_bpe(texts: Iterator[str], vocab_size: int, name: str) -> dict[str, Any]:
    """Learn `vocab_size - len(CHAT_TOKENS)` byte-level tokens from `texts`; the tokenizer's description."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    n_merged = vocab_size - len(CHAT_TOKENS)
    if n_merged < 256:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for merges past the 256 byte values and the special tokens",
            f"give vocab_size >= {256 + len(CHAT_TOKENS) + 1}",
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_merged,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
        min_frequency=2,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return _description(tokenizer, name)


def _description(tokenizer: Any, name: str) -> dict[str, Any]:
    """Ranks in merge order: the byte values, then each merge's result."""
    alphabet = _byte_alphabet()
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    tokens = [bytes([b]) for b in range(256)]
    for merge in merges:
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        tokens.append(bytes(alphabet[c] for c in left + right))
    return {
        "kind": "bpe",
        "name": name,
        "pattern": GPT4_PATTERN,
        "ranks": [base64.b64encode(t).decode("ascii") for t in tokens],
        "special": list(CHAT_TOKENS),
    }


VAL_REPORT_CHARS = 20_000_000  # held-out text the compression report reads at most


def train_tokenizer(cfg: TrainTokenizerConfig) -> dict[str, Any]:
    """scripts/train_tokenizer.py: learn from the source's first (1 - data.val_fraction), save the tokenizer,
    and report its compression (UTF-8 bytes per token) on the held-out tail against GPT-2's encoding, with a
    check that every held-out piece decodes back to itself. Returns the report."""
    from hydragpt.data.prepare import batch_texts
    from hydragpt.data.sources import batches, open_source
    from hydragpt.data.tokenizer import BpeTokenizer

    d = cfg.data
    out = Path(cfg.out or Path(cfg.paths.data_dir) / "tokenizers" / f"{d.name}_{cfg.vocab_size}.json")
    source = open_source(d, Path(cfg.paths.data_dir) / d.name, TASK_BYTES)
    if source.total_bytes is None:
        raise UserError(
            f"{source.description} has no known size, so its tail cannot be held out",
            "train the tokenizer on files or a downloaded (not streamed) Hugging Face dataset",
        )
    val_from = source.total_bytes * (1 - (d.val_fraction or 0))
    held_out: list[str] = []
    seen = {"bytes": 0, "chars": 0}

    def training_texts() -> Iterator[str]:
        progress = tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc="reading", delay=2)
        for batch in batches(source.records(), TASK_BYTES):
            for text in batch_texts(batch, d.text_field):
                size = len(text.encode("utf-8"))
                # the text up to the held-out tail trains (within the character budget), the rest is held out
                cut = len(text.encode("utf-8")[: max(0, int(val_from - seen["bytes"]))].decode("utf-8", "ignore"))
                train, tail = text[:cut], text[cut:]
                if train and seen["chars"] < cfg.max_chars:
                    seen["chars"] += len(train)
                    yield train
                if tail and sum(map(len, held_out)) < VAL_REPORT_CHARS:
                    held_out.append(tail)
                seen["bytes"] += size
            progress.update(batch.n_bytes)
        progress.close()

    start = time.perf_counter()
    try:
        description = train_bpe(training_texts(), cfg.vocab_size, out.stem)
    except ValueError as ex:
        raise UserError(*ex.args) from ex
    seconds = time.perf_counter() - start
    tokenizer = BpeTokenizer(description)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(description))
    tmp.replace(out)
    n_bytes = sum(len(t.encode("utf-8")) for t in held_out)
    ours = sum(len(tokenizer.encode(t)) for t in held_out)
    report = {
        "tokenizer": str(out),
        "vocab_size": tokenizer.vocab_size,
        "train_chars": seen["chars"],
        "seconds": round(seconds, 2),
        "val_bytes": n_bytes,
        "bytes_per_token": n_bytes / ours if ours else None,
        "gpt2_bytes_per_token": _gpt2_bytes_per_token(held_out, n_bytes),
        "round_trip": all(tokenizer.decode(tokenizer.encode(t)) == t for t in held_out),
    }
    log.info(
        "%s: %d tokens learned from %s characters in %.1f s; held-out text: %.3f bytes per token (GPT-2's: %s)",
        out,
        tokenizer.vocab_size,
        f"{seen['chars']:,}",
        seconds,
        report["bytes_per_token"] or 0,
        f"{report['gpt2_bytes_per_token']:.3f}" if report["gpt2_bytes_per_token"] else "not available offline",
    )
    return report


def _gpt2_bytes_per_token(texts: list[str], n_bytes: int) -> float | None:
    import tiktoken

    try:
        gpt2 = tiktoken.get_encoding("gpt2")
    except Exception:  # its BPE files are downloaded on first use
        log.warning("GPT-2's encoding is not available (offline?): no comparison")
        return None
    tokens = sum(len(gpt2.encode_ordinary(t)) for t in texts)
    return n_bytes / tokens if tokens else None
