"""Text generation from a trained model, and what `scripts/sample.py` runs.

A checkpoint alone is enough: it carries the weights, the model's shape and the tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hydragpt.config import SampleConfig
from hydragpt.data.tokenizer import Tokenizer, encode_prompt, tokenizer_from_description
from hydragpt.engine.checkpoint import CHECKPOINT_DIR, load_checkpoint, load_weights
from hydragpt.engine.system import autocast, resolve_device, resolve_dtype
from hydragpt.errors import UserError
from hydragpt.hf import is_pretrained
from hydragpt.model import GPT, GPTConfig, KVCache

log = logging.getLogger("hydragpt.sample")

FILE_PREFIX = "FILE:"
SEPARATOR = "---------------"


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick the next token id from last-position logits (B, V): greedy at temperature 0, else sample
    from the temperature-scaled distribution restricted to the top_k tokens and the top_p mass."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # from the max down: a tiny temperature then gives -inf (never chosen), not an inf - inf = nan
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


def window_start(length: int, block_size: int, origin: int = 0, sliding_layers: int = 0) -> int:
    """Where the model's context starts in a sequence of `length` tokens whose first window starts at
    `origin` (the prompt's last `block_size` tokens).

    Up to a full block the window grows. Past that, rotary positions slide: each position attends to the
    block_size positions up to itself, and the cache keeps every position's keys as they were computed
    (model.KVCache). Through `sliding_layers` layers the next token then depends on the last
    n_layer * (block_size - 1) + 1 tokens, which recomputing must read. Learned positions cannot slide
    while keeping cached keys (each would change position); instead the window jumps: it restarts from the
    last half block and grows again to a full block. Cached and uncached generation both follow this, so
    they compute the same thing.
    """
    if length - origin <= block_size:
        return origin
    if sliding_layers:
        return max(origin, length - sliding_layers * (block_size - 1) - 1)
    jump = block_size - block_size // 2
    return origin + -(-(length - origin - block_size) // jump) * jump


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
    use_cache: bool = True,
    compile: bool = False,
    cache: KVCache | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B, 1) one step at a time, continuing the prompts `idx` (B, T).

    With `use_cache` the context window is run through the model once (prefill), then only each new
    token (its keys and values join the cache); without, the whole window is recomputed every step.
    `compile` runs those one-token steps through torch.compile, in shapes that do not change from step to
    step (see model.KVCache), so it compiles once per batch size. `vocab_limit` keeps padded vocabulary
    rows (never seen in training) from being sampled. A `cache` given holds the keys of the first
    cache.length tokens of `idx` already (a chat's earlier turns): only the tokens after them are fed.
    """
    block_size, slides = model.config.block_size, model.config.positions == "rope"
    sliding_layers = model.config.n_layer if slides else 0
    origin = max(0, idx.size(1) - block_size)  # a long prompt: its last block
    dropped = 0  # tokens before idx[:, 0], no longer in any window: memory and time stay flat however long
    if cache is not None and cache.length >= idx.size(1):
        raise ValueError(f"the cache holds {cache.length} tokens, not fewer than the prompt's {idx.size(1)}")
    if cache is None and use_cache:
        cache = KVCache(model.config.n_layer, block_size)
    cached_from = 0 if cache is not None and cache.length else -1  # where the cached window starts (-1: none)
    step = torch.compile(model, dynamic=False) if compile and cache is not None else None  # one graph per batch size
    token = idx[:, -1:]  # the newest token; steps after the first feed it to the cache
    for _ in range(max_new_tokens):
        start = window_start(dropped + idx.size(1), block_size, origin, sliding_layers)
        idx, dropped = idx[:, start - dropped :], start
        unfed = 0 if cache is None else start + idx.size(1) - cached_from - cache.length  # 1 but after a given cache
        overflows = unfed > 1 and cache is not None and cache.length + unfed > block_size
        if cache is None:
            logits, _ = model(idx)
        elif not (cache.length and (slides or start == cached_from)) or overflows:
            # the first window, (learned positions) a new one, or more after a given cache than fits: prefill
            cache.reset()
            cached_from = start
            logits, _ = model(idx, cache=cache)
        elif unfed > 1:  # a given cache: the tokens after it
            logits, _ = model(idx[:, -unfed:], cache=cache)
        elif step is None:
            logits, _ = model(token, cache=cache)
        else:  # compiled, at a position tensor; fed `token` itself, since idx[:, -1:] has strides that grow
            cache.position = torch.tensor(cache.length, device=idx.device)
            logits, _ = step(token, cache=cache)
            cache.position, cache.length = None, cache.length + 1
        logits = logits[:, -1, :].float()
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        token = next_token(logits, temperature, top_k, top_p, generator)
        idx = torch.cat((idx, token), dim=1)
        yield token


def latest_checkpoint(output_dir: Path) -> Path:
    """The most recently written last.pt under the outputs directory (what `make sample` uses)."""
    candidates = list(output_dir.glob(f"**/{CHECKPOINT_DIR}/last.pt"))
    if not candidates:
        raise UserError(
            f"no checkpoint under {output_dir}/",
            f"train first (python scripts/train.py paths.output_dir={output_dir}), or pass ckpt=<run dir or .pt file>",
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def read_prompt(start: str) -> str:
    if not start.startswith(FILE_PREFIX):
        return start
    path = Path(start.removeprefix(FILE_PREFIX)).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist", "check the path: relative paths start where you launch")
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as ex:
        raise UserError(f"cannot read prompt file {path}: {ex}", "give a readable UTF-8 text file") from ex


def load_source(ckpt: str, init_from: str | None, output_dir: Path) -> tuple[dict, str]:
    """What sample.py and eval.py run: a pretrained GPT-2 (`init_from`), else a checkpoint (`ckpt`,
    "latest" for the newest under the outputs directory); with a description for the log."""
    if init_from:
        if not is_pretrained(init_from):
            raise UserError(f"unknown init_from={init_from}", "use gpt2, gpt2-medium, gpt2-large, gpt2-xl or hf:<dir>")
        return load_weights(init_from), init_from
    path = latest_checkpoint(output_dir) if ckpt == "latest" else Path(ckpt)
    return load_checkpoint(path), str(path)


def load_model(ckpt: dict, device: torch.device) -> tuple[GPT, Tokenizer]:
    model = GPT(GPTConfig(**{**ckpt["model_config"], "dropout": 0.0}))
    model.load_state_dict(ckpt["model"])
    model.eval().to(device)
    return model, tokenizer_from_description(ckpt["tokenizer"])


@dataclass
class Settings:
    """What one generation call needs besides the model; chat changes temperature and length as it goes."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: list[str]
    use_cache: bool
    compile: bool = False


def _held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not shown yet)."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def unescape(text: str) -> str:
    """`\\n`, `\\t` and the like typed on the command line, as the characters they mean."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string (left out), and whether one was found."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    settings: Settings,
    generator: torch.Generator,
    dtype: torch.dtype,
    stream: Callable[[str], None] | None = None,
    end_token: int | None = None,
) -> list[str]:
    """A continuation of each prompt (all of one length), generated as one batch, each ending at a stop
    string or at `end_token` (left out).

    `stream` gets the first continuation's text piece by piece as it is generated (never half a
    multi-byte character, never a stop string).
    """
    return complete_tokens(model, tokenizer, prompts, settings, generator, dtype, stream, end_token)[0]


def complete_tokens(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    settings: Settings,
    generator: torch.Generator,
    dtype: torch.dtype,
    stream: Callable[[str], None] | None = None,
    end_token: int | None = None,
    cache: KVCache | None = None,
) -> tuple[list[str], list[list[int]]]:
    """`complete`'s texts, and the token ids generated for each (up to a stop string or `end_token`, which
    they leave out, or all of them); `cache` holds the prompts' first tokens already (see `generate`)."""
    device = next(model.parameters()).device
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    ids: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    tail = max((len(s) for s in settings.stop), default=0) * 4 + 4  # tokens that can hold a stop string
    shown, shown_text = 0, ""  # streamed: the first sample's tokens and text so far
    progress = tqdm(  # long generations show their progress on stderr (short ones never do)
        total=settings.max_new_tokens, desc="sampling", unit="tok", delay=3, disable=stream is not None
    )
    with autocast(device, dtype), progress:
        steps = generate(
            model,
            idx,
            settings.max_new_tokens,
            settings.temperature,
            settings.top_k,
            settings.top_p,
            generator,
            tokenizer.vocab_size,
            settings.use_cache,
            settings.compile,
            cache,
        )
        for token in steps:
            progress.update()
            for i, new in enumerate(token[:, 0].tolist()):
                if not stopped[i] and new == end_token:
                    stopped[i] = True
                elif not stopped[i]:
                    ids[i].append(new)
                    recent = ids[i][-tail:]  # decoded only when there are stop strings to look for
                    stopped[i] = bool(settings.stop) and cut_at_stop(tokenizer.decode(recent), settings.stop)[1]
            if stream is not None and not stopped[0]:
                pending = tokenizer.decode(ids[0][shown:])  # held back while it may start a stop string
                if pending and not _held_back(pending, settings.stop) and not pending.endswith("\ufffd"):
                    stream(pending)
                    shown, shown_text = len(ids[0]), shown_text + pending
            if all(stopped):
                break
    texts = [cut_at_stop(tokenizer.decode(i), settings.stop)[0] for i in ids]
    if stream is not None:
        stream(texts[0][len(shown_text) :])
    return texts, ids


def format_samples(prompt: str, completions: list[str], output_format: str) -> str:
    if output_format == "jsonl":
        return "".join(
            json.dumps({"sample": i, "prompt": prompt, "completion": c, "text": prompt + c}) + "\n"
            for i, c in enumerate(completions)
        )
    return "".join(f"{prompt}{c}\n{SEPARATOR}\n" for c in completions)


def sample(cfg: SampleConfig) -> list[str]:
    """Print `num_samples` continuations of the prompt to stdout (and to `out`), or chat."""
    source, name = load_source(cfg.ckpt, cfg.init_from, Path(cfg.paths.output_dir))
    device = resolve_device(cfg.device, key="device")
    dtype = resolve_dtype(cfg.dtype, device)
    log.info("sampling from %s on %s", name, device)
    model, tokenizer = load_model(source, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop = [unescape(s) for s in cfg.stop]  # stop=['\\n\\n'] means a blank line
    settings = Settings(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, stop, cfg.use_cache, cfg.compile)
    if cfg.chat:
        from hydragpt.chat_session import chat

        chat(model, tokenizer, source, settings, generator, dtype)
        return []
    prompt = read_prompt(cfg.start)
    prompt_ids = encode_prompt(tokenizer, prompt, "start")
    completions = complete(model, tokenizer, [prompt_ids] * cfg.num_samples, settings, generator, dtype)
    output = format_samples(prompt, completions, cfg.format)
    print(output, end="", flush=True)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(output, encoding="utf-8")
        log.info("samples written to %s", cfg.out)
    return [prompt + c for c in completions]
