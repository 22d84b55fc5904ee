"""Dataset preparation: raw corpus -> token shards + meta.json under `<paths.data_dir>/<data.name>/`.

The corpus is read as a stream of bounded batches (`sources.py`) and tokenized by a pool of worker
processes, at most two batches per worker in flight, so memory stays flat however large the corpus.
Results come back in order and are written into fixed-size shards per split (`shards.py`).

The validation split (`data.val_split`):
- `tail`: the last `val_fraction` of the corpus's characters, as nanoGPT splits a single text. Needs a
  first pass that counts characters (which the char tokenizer needs anyway, for its vocabulary).
- `docs`: each document independently, with probability `val_fraction` (seeded by `data.split_seed`).
- `head`: the first `val_tokens` tokens of the stream, as build-nanogpt makes FineWeb's first shard val.
Documents are separated by the tokenizer's separator (GPT-2's <|endoftext|>), the first has none.

`data.format=chat` reads conversations instead (`chat.py`): each is rendered with the chat template into
documents that start with <|bos|>, and a loss mask (one uint8 per token, 1 on the assistant's replies) is
written beside the tokens, in `<split>_mask_*.bin` shards as long as the token shards.

Everything is written into a staging directory, `<dataset>/.prepare/`, and moved into place at the end,
so a failure never touches a dataset prepared before (`overwrite=true` included). An interrupted
preparation resumes: `progress.json` there records, after every finished shard, how many batches are
done and how far each split's partial shard got, and re-running with the same settings continues.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from hydragpt.config import DataConfig, PrepareConfig
from hydragpt.data.chat import ChatTemplate, conversation
from hydragpt.data.dataset import (
    META_FILE,
    META_FORMAT,
    SPLITS,
    TOKEN_SETTINGS,
    DatasetMeta,
    dataset_fingerprint,
    read_meta,
    setting_differences,
    token_settings,
    write_meta,
)
from hydragpt.data.identity import another_name, command_for, listed
from hydragpt.data.shards import PARTIAL_SUFFIX, ShardWriter
from hydragpt.data.sources import JSONL, Batch, Source, batches, open_source, record_fields
from hydragpt.data.tokenizer import (
    CHAR,
    CharTokenizer,
    Tokenizer,
    named_tokenizer,
    token_dtype,
    tokenizer_from_description,
)
from hydragpt.errors import UserError

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
PUBLISH_FILE = "publish.json"  # in the staging directory: every shard is done, only moving them in is left
STAGING_DIR = ".prepare"
Item = TypeVar("Item")
Result = TypeVar("Result")


# --- work done in the worker processes -------------------------------------------------------------

_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: dict[str, Any] | None) -> None:
    global _tokenizer
    _tokenizer = None if tokenizer is None else tokenizer_from_description(tokenizer)


def _init_pool_worker(tokenizer: dict[str, Any] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle, once
    _init_worker(tokenizer)


def _json_object(record: str | bytes, origin: str) -> dict[str, Any]:
    try:
        value = json.loads(record)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise UserError(
            f"{origin} has a line that is not a JSON object: {record[:60]!r}",
            "fix or remove that line: each line of a .jsonl file is one JSON object",
        )
    return value


def batch_texts(batch: Batch, text_field: str) -> list[str]:
    """The documents' text; null is an empty document, anything else that is not text is an error."""
    texts = []
    for record, origin in zip(batch.records, batch.origins, strict=True):
        text = record
        if batch.kind == JSONL:
            try:
                text = _json_object(record, origin)[text_field]
            except KeyError:
                raise UserError(
                    f"{origin} has a record without the field '{text_field}'",
                    "set data.text_field to the field holding the text",
                ) from None
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise UserError(
                f"{origin}: field '{text_field}' holds {type(text).__name__}, not text", "set data.text_field"
            )
        texts.append(_without_surrogates(text))
    return texts


def _without_surrogates(text: str) -> str:
    """Lone UTF-16 surrogates (from JSON escapes) become U+FFFD, as tiktoken's encode_ordinary does."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


@dataclass
class Scanned:
    chars: int
    charset: str


def _scan(task: tuple[Batch, str]) -> Scanned:
    """First pass: characters in the batch and which ones occur."""
    texts = batch_texts(*task)
    return Scanned(sum(map(len, texts)), "".join(set().union(*map(set, texts))))


@dataclass
class Tokenized:
    tokens: dict[str, np.ndarray]  # per split; `head` puts the whole stream under "train" for the parent to route
    n_tokens: int
    first_document_split: str | None  # the split whose tokens start with the batch's first document's separator
    masks: dict[str, np.ndarray] | None = None  # chat: per split, the loss mask of each token


@dataclass
class SplitPlan:
    mode: str  # tail | docs | head
    val_from: int = 0  # tail: character offset in this batch where val starts (past the end: all train)
    fraction: float = 0.0  # docs
    seed: int = 0  # docs


def _val_documents(doc_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Whether each document goes to val: a splitmix64 hash of (seed, index), so the choice of a document
    never depends on how the corpus was batched."""
    with np.errstate(over="ignore"):
        z = doc_ids.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def _tokenize(task: tuple[Batch, DataConfig, SplitPlan]) -> Tokenized:
    batch, data, plan = task
    assert _tokenizer is not None
    if data.format == "chat":
        return _tokenize_chat(batch, data, plan)
    text_field = data.text_field
    encode, dtype = _tokenizer.encode_array, token_dtype(_tokenizer.vocab_size)
    separator = np.array([] if _tokenizer.separator is None else [_tokenizer.separator], dtype=dtype)
    texts = batch_texts(batch, text_field)
    doc_ids = batch.next_document - 1 + np.cumsum(batch.starts_document)
    in_val = _val_documents(doc_ids, plan.seed, plan.fraction) if plan.mode == "docs" else None
    pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    offset = 0  # characters of the batch before this record (tail)
    first_document_split = None
    for i, (text, starts) in enumerate(zip(texts, batch.starts_document, strict=True)):
        if not text:
            continue
        split = "val" if in_val is not None and in_val[i] else "train"
        if plan.mode == "tail" and offset >= plan.val_from:
            split = "val"
        if starts and len(separator):  # the parent drops the corpus's very first separator
            if first_document_split is None and not pieces[split]:
                first_document_split = split
            pieces[split].append(separator)
        if plan.mode == "tail" and offset < plan.val_from < offset + len(text):  # the split point is in here
            cut = plan.val_from - offset
            pieces["train"].append(encode(text[:cut]))
            pieces["val"].append(encode(text[cut:]))
        else:
            pieces[split].append(encode(text))
        offset += len(text)
    tokens = _joined(pieces, dtype)
    return Tokenized(tokens, sum(map(len, tokens.values())), first_document_split)


def _joined(pieces: dict[str, list[np.ndarray]], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Each split's pieces as one array of `dtype` (empty when there are none)."""
    return {split: np.concatenate([np.empty(0, dtype), *arrays]).astype(dtype) for split, arrays in pieces.items()}


def _tokenize_chat(batch: Batch, data: DataConfig, plan: SplitPlan) -> Tokenized:
    """Each conversation rendered with the chat template into documents of tokens and loss mask; whole
    conversations go to val (`docs` split), so no reply is trained on in one split and scored in the other."""
    assert _tokenizer is not None
    template, fields = ChatTemplate(_tokenizer), record_fields(data)
    dtype = token_dtype(_tokenizer.vocab_size)
    doc_ids = batch.next_document - 1 + np.cumsum(batch.starts_document)
    in_val = _val_documents(doc_ids, plan.seed, plan.fraction)
    tokens: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    masks: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for record, origin, val in zip(batch.records, batch.origins, in_val, strict=True):
        split = "val" if val else "train"
        for document, mask in template.render(
            conversation(_json_object(record, origin), fields, origin), data.max_conversation_tokens
        ):
            tokens[split].append(document)
            masks[split].append(mask)
    joined = _joined(tokens, dtype)
    return Tokenized(joined, sum(map(len, joined.values())), None, _joined(masks, np.dtype(np.uint8)))


def _ordered_map(
    fn: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    init_args: tuple[Any, ...],
) -> Iterator[tuple[Item, Result]]:
    """(item, fn(item)) for each item, in order, over a process pool with at most 2 x workers items in flight."""
    if workers == 1:
        _init_worker(*init_args)
        for item in items:
            yield item, fn(item)
        return
    with ProcessPoolExecutor(workers, initializer=_init_pool_worker, initargs=init_args) as pool:
        pending: deque[tuple[Item, Future[Result]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= 2 * workers:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


# --- the parent process --------------------------------------------------------------------------


def _workers(requested: int | None) -> int:
    return requested or len(os.sched_getaffinity(0))


def _fingerprint(cfg: PrepareConfig, source: Source) -> dict[str, Any]:
    """What must not change between an interrupted preparation and the one that continues it: the
    settings that shape the output, and the corpus itself (files, sizes, modification times)."""
    data = {k: v for k, v in asdict(cfg.data).items() if k != "sampling"}
    return {"data": data, "task_mb": cfg.task_mb, "source": source.identity}


def _progress_bar(source: Source, desc: str) -> tqdm:
    return tqdm(total=source.total_bytes, desc=desc, unit="B", unit_scale=True, dynamic_ncols=True, disable=None)


def _scan_corpus(cfg: PrepareConfig, source: Source, workers: int) -> dict[str, Any]:
    """Pass 1: characters per batch and the character set (for a `tail` split or the char tokenizer)."""
    chars_per_batch, charset, documents = [], set(), 0
    tasks = ((batch, cfg.data.text_field) for batch in batches(source.records(), cfg.task_mb * 2**20))
    with _progress_bar(source, "counting characters") as bar:
        for (batch, _), scanned in _ordered_map(_scan, tasks, workers, (None,)):
            chars_per_batch.append(scanned.chars)
            charset.update(scanned.charset)
            documents += batch.n_documents
            bar.update(batch.n_bytes)
    if documents > 1:
        charset.add("\n")  # the char tokenizer's document separator
    return {"chars_per_batch": chars_per_batch, "charset": "".join(sorted(charset))}


def _load_record(staging: Path, name: str, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """A progress or publish record of an interrupted preparation with these settings and this corpus.

    One made otherwise is an error, unless `overwrite` says to start over (then None, as for none).
    """
    path = staging / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = {}
    if record.get("fingerprint") == json.loads(json.dumps(fingerprint)):
        return record
    if overwrite:
        return None
    raise UserError(
        f"{staging.parent} holds an interrupted preparation made with other settings or another corpus",
        "re-run with the same settings to continue it, or with overwrite=true to start over",
    )


def _save_record(staging: Path, name: str, record: dict[str, Any]) -> None:
    tmp = staging / (name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / name)


def _is_output(path: Path) -> bool:
    """A file prepare writes (never a downloaded raw corpus cached beside them)."""
    return path.name == META_FILE or (
        path.name.startswith(tuple(f"{s}_" for s in SPLITS)) and path.name.endswith((".bin", PARTIAL_SUFFIX))
    )


def _publish(staging: Path, dataset_dir: Path, meta: DatasetMeta) -> None:
    """Replace the dataset's previous outputs by the staged ones; meta.json, written last, marks it done.

    Safe to repeat after an interruption: the old meta.json goes first, and shards moved already stay.
    """
    (dataset_dir / META_FILE).unlink(missing_ok=True)
    new_shards = {
        shard[key] for split in SPLITS for shard in meta.shards[split] for key in ("file", "mask_file") if key in shard
    }
    for path in dataset_dir.iterdir():
        moved_already = path.name in new_shards and not (staging / path.name).exists()
        if _is_output(path) and not moved_already:
            path.unlink()
    for name in sorted(new_shards):
        if (staging / name).exists():
            os.replace(staging / name, dataset_dir / name)
    write_meta(dataset_dir, meta)
    shutil.rmtree(staging)


def source_given(overrides: list[str]) -> bool:
    """Whether a prepare.py command line (Hydra's task overrides) sets data.source itself: a dataset prepared
    from another source is then not the one asked for (the default URL's local copy is)."""
    return any(override.split("=", 1)[0].lstrip("+~") == "data.source" for override in overrides)


def prepared_differently(recorded: dict[str, Any], asked: dict[str, Any], compare_source: bool) -> dict[str, Any]:
    """The token settings (and the source, if compared) asked for that differ from those recorded."""
    keys = (*TOKEN_SETTINGS, "source") if compare_source else TOKEN_SETTINGS
    return {key: asked[key] for key in setting_differences(recorded, asked, keys)}


def _refuse_other_settings(cfg: PrepareConfig, dataset_dir: Path, command_line: list[str] | None) -> None:
    """An existing dataset prepared otherwise is not the one asked for: say so rather than "already prepared"."""
    if command_line is None:  # called as a library: the fix names a command that prepares the same
        this_command = command_for(None, asdict(cfg.data), cfg.paths.data_dir)
    else:
        this_command = functools.partial(shlex.join, ["python", "scripts/prepare.py", *command_line])
    meta = read_meta(dataset_dir, this_command)
    asked = prepared_differently(meta.settings, token_settings(asdict(cfg.data)), source_given(command_line or []))
    if asked:
        was = listed({key: meta.settings.get(key) for key in asked})
        raise UserError(
            f"{dataset_dir} was prepared with {was}, not {listed(asked)} as asked",
            f"add overwrite=true to replace it, or data.name={another_name(cfg.data.name, asked)} to prepare"
            " these as another dataset",
        )


def prepare(cfg: PrepareConfig, command_line: list[str] | None = None) -> Path:
    """Tokenize the corpus into train/val shards; idempotent, and resumable, unless `overwrite` is set.

    `command_line` is prepare.py's own (Hydra's task overrides): a prepared dataset's source is compared
    with data.source only when it sets data.source.
    """
    d = cfg.data
    dataset_dir = Path(cfg.paths.data_dir) / d.name
    if not cfg.overwrite and (dataset_dir / META_FILE).is_file():
        _refuse_other_settings(cfg, dataset_dir, command_line)
        log.info("%s is already prepared in %s (overwrite=true to redo it)", d.name, dataset_dir)
        if any((dataset_dir / STAGING_DIR / record).exists() for record in (PROGRESS_FILE, PUBLISH_FILE)):
            log.warning(
                "%s holds an interrupted overwrite=true preparation: run with overwrite=true to continue it, "
                "or delete it",
                dataset_dir / STAGING_DIR,
            )
        return dataset_dir
    try:
        return _prepare(cfg, dataset_dir)
    except KeyboardInterrupt:
        log.warning("interrupted: run the same command again to continue from the last finished shard")
        raise SystemExit(130) from None


def _prepare(cfg: PrepareConfig, dataset_dir: Path) -> Path:
    d = cfg.data
    source = open_source(d, dataset_dir, cfg.task_mb * 2**20)
    staging = dataset_dir / STAGING_DIR
    fingerprint = _fingerprint(cfg, source)
    finished = _load_record(staging, PUBLISH_FILE, fingerprint, cfg.overwrite)
    if finished is not None and finished["meta"].get("format") == META_FORMAT:  # else an older hydragpt's
        log.info("finishing an interrupted preparation: every shard was done")
        _publish(staging, dataset_dir, DatasetMeta(**finished["meta"]))
        return dataset_dir
    progress = _load_record(staging, PROGRESS_FILE, fingerprint, cfg.overwrite)
    if progress is None:
        shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    workers = _workers(cfg.workers)
    start = time.perf_counter()

    scan = progress["scan"] if progress else None
    if scan is None and (d.val_split == "tail" or d.tokenizer == CHAR):
        scan = _scan_corpus(cfg, source, workers)
    chat = d.format == "chat"
    tokenizer: Tokenizer = CharTokenizer(scan["charset"]) if d.tokenizer == CHAR else named_tokenizer(d.tokenizer, chat)
    if chat:
        ChatTemplate(tokenizer)  # a tokenizer without the template's tokens is an error before any work
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(staging, split, dtype, d.shard_tokens) for split in SPLITS}
    if chat:  # each split's loss mask, in shards as long as its token shards
        writers |= {
            _mask(split): ShardWriter(staging, _mask(split), np.dtype(np.uint8), d.shard_tokens) for split in SPLITS
        }
    state = {"batches": 0, "documents": 0, "bytes": 0, "head_val_tokens": 0, "wrote_document": False}
    if progress:
        state = progress["state"]
        try:
            for split, writer in writers.items():
                writer.restore(**progress["writers"][split])
        except (OSError, UserError) as ex:
            what = f"cannot continue the interrupted preparation in {staging}: {ex}"
            raise UserError(what, "start over with overwrite=true") from ex
        log.info("continuing an interrupted preparation after %d batches", state["batches"])
    _write_shards(cfg, staging, source, tokenizer, scan, writers, state, workers)

    meta = _dataset_meta(cfg, tokenizer, writers, state["documents"])
    _save_record(staging, PUBLISH_FILE, {"fingerprint": fingerprint, "meta": asdict(meta)})
    _publish(staging, dataset_dir, meta)
    _log_summary(cfg, dataset_dir, meta, state["bytes"], time.perf_counter() - start, workers)
    return dataset_dir


def _write_shards(
    cfg: PrepareConfig,
    staging: Path,
    source: Source,
    tokenizer: Tokenizer,
    scan: dict[str, Any] | None,
    writers: dict[str, ShardWriter],
    state: dict[str, Any],
    workers: int,
) -> None:
    """Pass 2: tokenize the batches not done yet and write them, recording progress at each finished shard."""
    d, task_bytes = cfg.data, cfg.task_mb * 2**20
    plan = _split_plan(cfg, scan)

    def tasks() -> Iterator[tuple[Batch, DataConfig, SplitPlan]]:
        """Batches not done yet; done ones are still read, to keep document and character counts."""
        chars_before = 0
        for batch in batches(source.records(), task_bytes):
            val_from = plan.val_from - chars_before
            if scan is not None:
                if batch.index >= len(scan["chars_per_batch"]):
                    raise UserError(f"the corpus {source.description} changed while it was being prepared", "re-run")
                chars_before += scan["chars_per_batch"][batch.index]
            if batch.index >= state["batches"]:
                yield batch, d, SplitPlan(plan.mode, val_from, plan.fraction, plan.seed)

    start, n_tokens = time.perf_counter(), 0
    with _progress_bar(source, f"tokenizing {d.name}") as bar:
        bar.update(state["bytes"])
        for (batch, _, _), result in _ordered_map(_tokenize, tasks(), workers, (tokenizer.describe(),)):
            finished = _route(result, writers, d.val_tokens if d.val_split == "head" else None, state)
            n_tokens += result.n_tokens
            state["batches"] = batch.index + 1
            state["documents"] += batch.n_documents
            state["bytes"] += batch.n_bytes
            bar.update(batch.n_bytes)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - start):,.0f} tok/s", refresh=False)
            if finished:
                for writer in writers.values():
                    writer.flush()
                progress = {
                    "fingerprint": _fingerprint(cfg, source),
                    "scan": scan,
                    "state": state,
                    "writers": {split: writer.state() for split, writer in writers.items()},
                }
                _save_record(staging, PROGRESS_FILE, progress)
    for writer in writers.values():
        writer.close()


def _dataset_meta(
    cfg: PrepareConfig, tokenizer: Tokenizer, writers: dict[str, ShardWriter], documents: int
) -> DatasetMeta:
    """The finished dataset's description, once both splits are checked to hold tokens."""
    d = cfg.data
    shards = {
        split: [
            {"file": f, "tokens": n, "sha256": h}
            for f, n, h in zip(
                writers[split].files, writers[split].shard_sizes, writers[split].shard_sha256, strict=True
            )
        ]
        for split in SPLITS
    }
    for split in SPLITS:
        if mask := writers.get(_mask(split)):
            for entry, file, digest in zip(shards[split], mask.files, mask.shard_sha256, strict=True):
                entry |= {"mask_file": file, "mask_sha256": digest}
    meta = DatasetMeta(
        format=META_FORMAT,
        tokenizer=tokenizer.describe(),
        vocab_size=tokenizer.vocab_size,
        dtype=token_dtype(tokenizer.vocab_size).name,
        settings=token_settings(asdict(d)),
        documents=documents,
        tokens={split: sum(writers[split].shard_sizes) for split in SPLITS},
        shards=shards,
        fingerprint=dataset_fingerprint(tokenizer.describe(), shards),
    )
    if not any(meta.tokens.values()):
        source = d.source + (f" ({d.hf_name})" if d.hf_name else "")
        raise UserError(f"the corpus {source} is empty", "point data.source at a non-empty text corpus")
    if meta.tokens["train"] == 0 or meta.tokens["val"] == 0:
        empty = "train" if meta.tokens["train"] == 0 else "val"
        raise UserError(
            f"the {empty} split of {d.name} came out empty ({meta.documents} documents, {sum(meta.tokens.values())} "
            f"tokens in all)",
            "give a larger corpus, or change data.val_split / data.val_fraction / data.val_tokens",
        )
    return meta


def _split_plan(cfg: PrepareConfig, scan: dict[str, Any] | None) -> SplitPlan:
    d = cfg.data
    if d.val_split == "tail":
        assert scan is not None
        total = sum(scan["chars_per_batch"])
        return SplitPlan("tail", val_from=int(total * (1 - d.val_fraction)))  # nanoGPT's split point
    if d.val_split == "docs":
        return SplitPlan("docs", val_from=0, fraction=d.val_fraction, seed=d.split_seed)
    return SplitPlan("head")


def _route(result: Tokenized, writers: dict[str, ShardWriter], head_val: int | None, state: dict[str, Any]) -> int:
    """Write a batch's tokens to the split writers; returns how many shards that finished."""
    tokens = dict(result.tokens)
    if result.first_document_split is not None and not state["wrote_document"]:
        first = result.first_document_split  # the corpus's first document: no separator before it
        tokens[first] = tokens[first][1:]
    state["wrote_document"] = state["wrote_document"] or result.first_document_split is not None
    if head_val is not None:  # the first `head_val` tokens of the stream are val
        stream = tokens["train"]
        take = max(0, min(len(stream), head_val - state["head_val_tokens"]))
        tokens = {"val": stream[:take], "train": stream[take:]}
        state["head_val_tokens"] += take
    if result.masks is not None:
        for split in SPLITS:
            writers[_mask(split)].write(result.masks[split])
    return sum(writers[split].write(tokens[split]) for split in SPLITS)


def _mask(split: str) -> str:
    """The name of a split's loss-mask stream (its shards are `<split>_mask_000000.bin`, ...)."""
    return f"{split}_mask"


def _log_summary(
    cfg: PrepareConfig, dataset_dir: Path, meta: DatasetMeta, n_bytes: int, seconds: float, workers: int
) -> None:
    total_tokens = sum(meta.tokens.values())
    shard_bytes = sum((dataset_dir / s["file"]).stat().st_size for split in SPLITS for s in meta.shards[split])
    log.info(
        "prepared %s: %s document(s), %s bytes read -> %s train + %s val tokens (vocab %d, %s) in %d + %d shards "
        "(%s bytes), %.2fs with %d worker(s): %.1f MB/s, %s tokens/s -> %s",
        cfg.data.name,
        f"{meta.documents:,}",
        f"{n_bytes:,}",
        f"{meta.tokens['train']:,}",
        f"{meta.tokens['val']:,}",
        meta.vocab_size,
        meta.dtype,
        len(meta.shards["train"]),
        len(meta.shards["val"]),
        f"{shard_bytes:,}",
        seconds,
        workers,
        n_bytes / 1e6 / seconds,
        f"{total_tokens / seconds:,.0f}",
        dataset_dir,
    )
