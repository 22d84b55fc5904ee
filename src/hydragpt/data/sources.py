"""Where raw documents come from, read as a stream of bounded work batches for the tokenizing workers.

`data.source` is a local `.txt`, `.jsonl` or `.parquet` file, a directory or glob of them, a URL (downloaded
once into the dataset directory and reused from there), or `hf:<dataset>` for a Hugging Face dataset.
A `.txt` file is one document, cut into chunks at points where cutting cannot change its tokens; each
`.jsonl` line and each `.parquet` or Hugging Face row is one document. A chat dataset's rows come as JSON
records of the fields a conversation is read from (`record_fields`). Nothing here holds more than one
batch of text at a time, so preparation memory does not grow with the corpus.
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hydragpt.config import DataConfig
from hydragpt.errors import UserError

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
EXTENSIONS = (".txt", ".jsonl", ".parquet")
TEXT, JSONL = "text", "jsonl"  # record kinds: decoded text, or raw JSON lines the workers parse


@dataclass
class Record:
    kind: str
    payload: str | bytes
    starts_document: bool  # False for the second and later chunks of one .txt document
    n_bytes: int  # input bytes this record accounts for (progress and throughput)
    origin: str  # the file or dataset it came from, for error messages


@dataclass
class Batch:
    """One tokenization task: records of one kind, about `task_bytes` of text."""

    index: int
    kind: str
    next_document: int  # index the first document starting in this batch gets (documents count from 0)
    records: list[str | bytes] = field(default_factory=list)
    starts_document: list[bool] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    size: int = 0  # characters or bytes of the records' text, what a task is sized by
    n_bytes: int = 0  # input bytes, for progress

    @property
    def n_documents(self) -> int:
        return sum(self.starts_document)


@dataclass
class Source:
    description: str
    records: Callable[[], Iterator[Record]]  # each call reads the corpus again from its start
    total_bytes: int | None  # for the progress bar, when known up front
    identity: list[Any]  # what an interrupted preparation checks before continuing: files, sizes, times


def batches(records: Iterator[Record], task_bytes: int) -> Iterator[Batch]:
    """Group records into batches of about `task_bytes` of text each; a batch never mixes kinds."""
    current: Batch | None = None
    index = next_document = 0
    for record in records:
        if current is not None and (current.size >= task_bytes or current.kind != record.kind):
            yield current
            current, index = None, index + 1
        if current is None:
            current = Batch(index, record.kind, next_document)
        current.records.append(record.payload)
        current.starts_document.append(record.starts_document)
        current.origins.append(record.origin)
        current.size += len(record.payload)
        current.n_bytes += record.n_bytes
        next_document += record.starts_document
    if current is not None:
        yield current


def open_source(data: DataConfig, dataset_dir: Path, task_bytes: int) -> Source:
    """Resolve `data.source` and check it exists, before anything on disk is touched."""
    if not data.source:
        raise UserError(
            f"data.source is not set for data={data.name}",
            "set data.source=<.txt/.jsonl/.parquet file, directory, glob, URL or hf:<dataset>>",
        )
    if data.source.startswith(HF_PREFIX):
        return _hf_source(data)
    if _is_url(data.source):
        files = [_download(data.source, dataset_dir)]
    else:
        files = _local_files(data.source)
    if data.format == "chat" and (text_files := [f for f in files if f.name.endswith(".txt")]):
        raise UserError(
            f"data.format=chat reads conversations from .jsonl or .parquet records, not {text_files[0]}",
            'convert the conversations to .jsonl lines of {"messages": [{"role": ..., "content": ...}]}',
        )
    stats = [f.stat() for f in files]
    return Source(
        description=data.source,
        records=lambda: _file_records(files, record_fields(data), data.format == "chat", task_bytes),
        total_bytes=sum(st.st_size for st in stats),
        identity=[[str(f), st.st_size, st.st_mtime_ns] for f, st in zip(files, stats, strict=True)],
    )


def record_fields(data: DataConfig) -> list[str]:
    """The fields a record is read from: the text, a conversation's messages, or a question and its answer."""
    if data.format == "chat" and data.prompt_field and data.response_field:
        return [data.prompt_field, data.response_field]
    return [data.text_field]


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "ftp")


def _download(url: str, dataset_dir: Path) -> Path:
    """The URL's file, downloaded once into the dataset directory; a copy placed there is used as is."""
    name = Path(urlparse(url).path).name or "input.txt"
    cached = dataset_dir / (name if name.endswith(EXTENSIONS) else name + ".txt")
    if cached.is_file():
        log.info("using the corpus already downloaded at %s", cached)
        return cached
    log.info("downloading %s to %s", url, cached)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as ex:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url}: {ex}",
            f"download it yourself to {cached}, or set data.source=<local path>",
        ) from ex
    os.replace(partial, cached)
    return cached


def _local_files(source: str) -> list[Path]:
    """The corpus files named by a path, a directory (searched recursively) or a glob, in sorted order."""
    path = Path(source).expanduser()
    if path.is_file():
        if not path.name.endswith(EXTENSIONS):
            raise UserError(f"data.source {path} is not a {'/'.join(EXTENSIONS)} file", "convert it or rename it")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(EXTENSIONS))
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if p.endswith(EXTENSIONS))
    if not files:
        raise UserError(
            f"data.source '{source}' does not exist or holds no {'/'.join(EXTENSIONS)} files",
            "point data.source at a text corpus: a file, a directory, a glob, a URL or hf:<dataset>",
        )
    return files


def _file_records(files: list[Path], fields: list[str], chat: bool, chunk_bytes: int) -> Iterator[Record]:
    for path in files:
        if path.name.endswith(".txt"):
            yield from _txt_records(path, chunk_bytes)
        elif path.name.endswith(".jsonl"):
            yield from _jsonl_records(path)
        elif chat:
            yield from _parquet_rows(path, fields)
        else:
            yield from _parquet_records(path, fields[0])


def safe_cut(text: str, start: int = 0) -> int | None:
    """The last position in text[start:] where `text` can be cut without changing its BPE tokens, or None.

    The pre-tokenizer patterns of GPT-2 (r50k, p50k), cl100k and o200k all end a piece, and start the
    next, after a newline between two non-space characters (o200k: not before "/", which its punctuation
    pieces absorb along with newlines) and before a space between two letters.
    """
    end = len(text) - 1
    while (i := text.rfind("\n", max(start, 1), end)) > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace() and text[i + 1] != "/":
            return i + 1
        end = i
    end = len(text) - 1
    while (i := text.rfind(" ", max(start, 1), end)) > 0:
        if text[i - 1].isalpha() and text[i + 1].isalpha():
            return i
        end = i
    return None


# A chunk with no safe cut point grows to this many times the task size before it is cut anyway.
MAX_CHUNK_FACTOR = 8


def _txt_records(path: Path, chunk_bytes: int) -> Iterator[Record]:
    """One document per file, in chunks of about `chunk_bytes` cut at `safe_cut` points."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, pending_bytes, first, searched = "", 0, True, 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            try:
                pending += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as ex:
                raise UserError(f"{path} is not UTF-8 text", "convert it to UTF-8 or give another source") from ex
            pending_bytes += len(raw)
            if not raw:
                break
            cut = safe_cut(pending, start=max(searched - 1, 0))  # earlier text held no cut point
            searched = len(pending)
            if cut is None and len(pending) > MAX_CHUNK_FACTOR * chunk_bytes:
                log.warning("%s: no safe cut point in %d characters; cutting anyway may change a token", path, searched)
                cut = len(pending)
            if cut is None:  # read on: a chunk grows rather than change tokens
                continue
            done = len(pending[:cut].encode())
            yield Record(TEXT, pending[:cut], first, done, str(path))
            pending, pending_bytes, first, searched = pending[cut:], pending_bytes - done, False, 0
    if pending or first:
        yield Record(TEXT, pending, first, pending_bytes, str(path))


def _jsonl_records(path: Path) -> Iterator[Record]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield Record(JSONL, line, True, len(line), str(path))


def _open_parquet(path: Path, fields: list[str], fix: str) -> Any:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as ex:  # pyarrow raises its own error types for a foreign or damaged file
        raise UserError(f"{path} is not a readable parquet file: {ex}", "check the file") from ex
    for name in fields:
        if name not in parquet.schema_arrow.names:
            raise UserError(f"{path} has no column '{name}' (columns: {', '.join(parquet.schema_arrow.names)})", fix)
    return parquet


def _parquet_rows(path: Path, fields: list[str]) -> Iterator[Record]:
    """Each row's `fields` as one JSON record (a conversation's messages, or a question and its answer)."""
    parquet = _open_parquet(path, fields, "set data.text_field, or data.prompt_field and data.response_field")
    size, rows, done_rows, done_bytes = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0, 0
    for table in parquet.iter_batches(batch_size=1024, columns=fields):
        for row in table.to_pylist():
            done_rows += 1
            n_bytes = size * done_rows // rows - done_bytes
            done_bytes += n_bytes
            yield Record(JSONL, json.dumps(row, default=str).encode(), True, n_bytes, str(path))


def _parquet_records(path: Path, text_field: str) -> Iterator[Record]:
    import pyarrow as pa

    parquet = _open_parquet(path, [text_field], "set data.text_field to the column holding the text")
    column_type = parquet.schema_arrow.field(text_field).type
    if pa.types.is_dictionary(column_type):  # pandas categories: the values are what count
        column_type = column_type.value_type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column '{text_field}' holds {column_type}, not text", "set data.text_field")
    size, rows, done_rows, done_bytes = path.stat().st_size, max(parquet.metadata.num_rows, 1), 0, 0
    for table in parquet.iter_batches(batch_size=1024, columns=[text_field]):
        for text in table.column(0).to_pylist():
            done_rows += 1
            n_bytes = size * done_rows // rows - done_bytes  # the file's bytes, spread over its rows
            done_bytes += n_bytes
            yield Record(TEXT, text or "", True, n_bytes, str(path))


def _hf_source(data: DataConfig) -> Source:
    """A Hugging Face dataset, loaded (downloaded once into HF's cache) or streamed, one document per row."""
    import datasets

    from hydragpt.hf import quiet_hub_retries

    quiet_hub_retries()

    name = data.source.removeprefix(HF_PREFIX)
    fields, chat = record_fields(data), data.format == "chat"
    label = name + (f" ({data.hf_name})" if data.hf_name else "")
    try:
        dataset = datasets.load_dataset(name, data.hf_name, split=data.hf_split, streaming=data.streaming)
        identity = [name, data.hf_name, data.hf_split, getattr(dataset, "_fingerprint", None)]
        dataset = dataset.select_columns(fields)
    except Exception as ex:  # network, hub and schema errors come in many types
        first_line = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise UserError(
            f"could not load the Hugging Face dataset {label}: {first_line}",
            "check the name and the network, or download its .parquet/.jsonl files and set data.source=<that dir>",
        ) from ex

    def records() -> Iterator[Record]:
        for rows in dataset.iter(batch_size=1024):
            if chat:
                for row in zip(*(rows[name] for name in fields), strict=True):
                    line = json.dumps(dict(zip(fields, row, strict=True)), default=str).encode()
                    yield Record(JSONL, line, True, len(line), label)
                continue
            for text in rows[data.text_field]:
                text = text or ""
                yield Record(TEXT, text, True, len(text), label)

    return Source(description=data.source, records=records, total_bytes=None, identity=identity)
