"""Dataset preparation: raw corpus -> token files + meta.json under `<paths.data_dir>/<data.name>/`.

The raw corpus comes from `data.source`, a local path or a URL. A URL is downloaded once into the dataset
directory and reused from there, so a corpus placed there beforehand needs no network at all.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from hydragpt.config import PrepareConfig
from hydragpt.data.dataset import META_FILE, TOKEN_DTYPE, split_path, write_meta
from hydragpt.data.tokenizer import CharTokenizer
from hydragpt.errors import UserError

log = logging.getLogger(__name__)


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "ftp")


def fetch_source(source: str, dataset_dir: Path) -> Path:
    """Local path of the raw corpus: `source` itself, or its download cached in `dataset_dir`."""
    if not _is_url(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"data.source '{source}' does not exist", "point data.source at a text file or a URL")
        return path
    cached = dataset_dir / (Path(urlparse(source).path).name or "input.txt")
    if cached.is_file():
        log.info("using the corpus already downloaded at %s", cached)
        return cached
    log.info("downloading %s to %s", source, cached)
    dataset_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.name + ".part")
    try:
        with urllib.request.urlopen(source, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as ex:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"could not download {source}: {ex}",
            f"download it yourself to {cached}, or set data.source=<local path>",
        ) from ex
    os.replace(partial, cached)
    return cached


def _write_tokens(path: Path, ids: list[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    np.asarray(ids, dtype=TOKEN_DTYPE).tofile(tmp)
    os.replace(tmp, path)


def prepare(cfg: PrepareConfig) -> Path:
    """Tokenize the corpus into train/val token files; idempotent unless `overwrite` is set."""
    dataset_dir = Path(cfg.paths.data_dir) / cfg.data.name
    if (dataset_dir / META_FILE).is_file() and not cfg.overwrite:
        log.info("%s is already prepared in %s (overwrite=true to redo it)", cfg.data.name, dataset_dir)
        return dataset_dir
    start = time.perf_counter()
    raw_path = fetch_source(cfg.data.source, dataset_dir)
    try:
        text = raw_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as ex:
        raise UserError(f"{raw_path} is not UTF-8 text", "give data.source a plain-text corpus") from ex
    if not text:
        raise UserError(f"the corpus {raw_path} is empty", "point data.source at a non-empty text file")

    tokenizer = CharTokenizer.from_text(text)
    n_train = int(len(text) * (1 - cfg.data.val_fraction))  # split by characters, as nanoGPT does
    train_ids = tokenizer.encode(text[:n_train])
    val_ids = tokenizer.encode(text[n_train:])

    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / META_FILE).unlink(missing_ok=True)  # meta.json is written last: it marks a finished prepare
    _write_tokens(split_path(dataset_dir, "train"), train_ids)
    _write_tokens(split_path(dataset_dir, "val"), val_ids)
    write_meta(
        dataset_dir,
        tokenizer=tokenizer.describe(),
        vocab_size=tokenizer.vocab_size,
        tokens={"train": len(train_ids), "val": len(val_ids)},
        source=str(cfg.data.source),
    )
    seconds = time.perf_counter() - start
    log.info(
        "prepared %s: %s characters, vocab %d, %s train + %s val tokens in %.2fs -> %s",
        cfg.data.name,
        f"{len(text):,}",
        tokenizer.vocab_size,
        f"{len(train_ids):,}",
        f"{len(val_ids):,}",
        seconds,
        dataset_dir,
    )
    return dataset_dir
