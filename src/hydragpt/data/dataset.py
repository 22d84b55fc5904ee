"""Prepared datasets on disk: `meta.json` plus each split's token shards, read as one memory-mapped array.

A prepared dataset directory holds `train_000000.bin, ...` and `val_000000.bin, ...` (see `shards.py`) and
`meta.json`: tokenizer description, vocab size, token dtype, the `data.*` settings it was prepared with, the
shard list with each shard's token count and sha256, and the dataset's fingerprint (a sha256 over the
tokenizer and that list), which checkpoints carry to tell their data apart. meta.json is written last, so its
presence marks a finished preparation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hydragpt.data.shards import open_shard
from hydragpt.data.tokenizer import Tokenizer, token_dtype, tokenizer_from_description
from hydragpt.errors import UserError

if TYPE_CHECKING:
    from hydragpt.data.chat_batches import Conversations

META_FILE = "meta.json"
META_FORMAT = 3  # 3: the data.* settings it was prepared with, a sha256 per shard, the dataset's fingerprint
SPLITS = ("train", "val")
# The data.* settings that decide which tokens a dataset holds: a run asking for other values than its
# meta.json records would train on data its config does not describe. (data.source is recorded too, but a
# local copy of the default URL is the same corpus: only prepare.py compares it, when it is given.)
TOKEN_SETTINGS = (
    "tokenizer",
    "val_split",
    "val_fraction",
    "val_tokens",
    "split_seed",
    "text_field",
    "hf_name",
    "hf_split",
    "format",
    "prompt_field",
    "response_field",
    "max_conversation_tokens",
)
# The split knobs each data.val_split leaves unread: a difference there changes no token.
_UNREAD = {"tail": {"val_tokens", "split_seed"}, "docs": {"val_tokens"}, "head": {"val_fraction", "split_seed"}}
# The knobs a text dataset leaves unread (one prepared before data.format existed records none of them).
_CHAT_ONLY = {"prompt_field", "response_field", "max_conversation_tokens"}

# The prepare.py command that makes a dataset, for the fix of an error about it: called only when an error
# needs it (deriving the command composes Hydra's config, which takes a while).
PrepareCommand = Callable[[], str]


@dataclass
class DatasetMeta:
    format: int
    tokenizer: dict[str, Any]
    vocab_size: int
    dtype: str
    settings: dict[str, Any]  # the data.* values it was prepared with: TOKEN_SETTINGS and source (as given)
    documents: int
    tokens: dict[str, int]  # per split
    # per split: [{"file": "train_000000.bin", "tokens": n, "sha256": h}]; a chat dataset's entries also name
    # the shard of its loss mask, one uint8 per token: {"mask_file": "train_mask_000000.bin", "mask_sha256": h}
    shards: dict[str, list[dict[str, Any]]]
    fingerprint: str  # dataset_fingerprint(tokenizer, shards)


def dataset_fingerprint(tokenizer: dict[str, Any], shards: dict[str, list[dict[str, Any]]]) -> str:
    """sha256 over the tokenizer description and the ordered (split, file, tokens, sha256) of every shard:
    equal fingerprints, equal tokens, computed from meta.json alone (no shard is read)."""
    listing = [
        [split, s["file"], s["tokens"], s["sha256"], *([s["mask_file"], s["mask_sha256"]] if "mask_file" in s else [])]
        for split in SPLITS
        for s in shards.get(split, [])
    ]
    text = json.dumps([tokenizer, listing], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def token_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """What meta.json records of a data config (a DataConfig as a dict): TOKEN_SETTINGS and the source."""
    return {key: data.get(key) for key in (*TOKEN_SETTINGS, "source")}


def setting_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The `keys` whose values differ between the settings a dataset was prepared with and those asked
    for; a split knob that neither side's val_split reads is no difference."""
    unread = _UNREAD.get(recorded.get("val_split"), set()) & _UNREAD.get(wanted.get("val_split"), set())
    if recorded.get("format", "text") == wanted.get("format", "text") == "text":
        unread |= _CHAT_ONLY
    recorded = {"format": "text", **recorded}
    return [key for key in keys if key not in unread and recorded.get(key) != wanted.get(key)]


def write_meta(dataset_dir: Path, meta: DatasetMeta) -> None:
    tmp = dataset_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(meta), indent=2) + "\n")
    os.replace(tmp, dataset_dir / META_FILE)


def read_meta(dataset_dir: Path, prepare_command: PrepareCommand) -> DatasetMeta:
    """The dataset's meta.json, checked; `prepare_command` gives the command that prepares it, for the fix."""
    path = dataset_dir / META_FILE
    if not path.is_file():
        raise UserError(
            f"dataset '{dataset_dir.name}' is not prepared: {path} not found", f"run `{prepare_command()}` first"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as ex:
        raise UserError(f"{path} is not a valid dataset description", _redo(prepare_command)) from ex
    if not isinstance(raw, dict) or raw.get("format") != META_FORMAT:
        raise UserError(f"{path} was written by another version of hydragpt's prepare", _redo(prepare_command))
    try:
        meta = DatasetMeta(**raw)
        valid = meta.fingerprint == dataset_fingerprint(meta.tokenizer, meta.shards)
    except (TypeError, KeyError, AttributeError) as ex:
        raise UserError(f"{path} is not a valid dataset description", _redo(prepare_command)) from ex
    if not valid:
        raise UserError(f"{path} was edited: its fingerprint does not match its shard list", _redo(prepare_command))
    return meta


def _redo(prepare_command: PrepareCommand) -> str:
    return f"re-run `{prepare_command()} overwrite=true`"


class SplitTokens:
    """One split's shards seen as a single token array: windows may cross from one shard into the next.

    `files` are the shards' paths, when they come from disk: every read first checks (one stat per shard
    read) that the file is still the one mapped at the start, since reading a memory-mapped file that was
    cut short kills the process with a bus error, and one deleted or replaced under a run would quietly
    feed it stale or different tokens. A change between the check and the read itself still escapes it.
    """

    def __init__(self, shards: list[np.ndarray], files: list[Path] | None = None) -> None:
        kept = [i for i, shard in enumerate(shards) if len(shard)]
        self.shards = [shards[i] for i in kept]
        self.files = [files[i] for i in kept] if files is not None else []
        self._identities = [_identity(path) for path in self.files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # global offset of each shard, then the end

    def _verify(self, shard: int) -> None:
        if not self.files:
            return
        path = self.files[shard]
        fix = (
            "put the dataset back as it was (or re-prepare it the same way) and run again;"
            " resume=<run dir> continues a training run"
        )
        try:
            inode, size = _identity(path)
        except FileNotFoundError:
            raise UserError(f"{path} disappeared while in use", fix) from None
        expected_inode, expected_size = self._identities[shard]
        if size != expected_size:
            raise UserError(f"{path} changed size while in use ({expected_size:,} -> {size:,} bytes)", fix)
        if inode != expected_inode:
            raise UserError(f"{path} was replaced by another file while in use", fix)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, read across shard boundaries."""
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            self._verify(shard)
            local = start - int(self.starts[shard])
            piece = self.shards[shard][local : local + length]
            pieces.append(piece)
            start, length, shard = start + len(piece), length - len(piece), shard + 1
        return np.concatenate(pieces).astype(np.int64)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(len(starts), length) int64 windows; those inside one shard are gathered in one vectorised read."""
        out = np.empty((len(starts), length), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1
        offsets = np.arange(length)
        for shard in np.unique(shard_of):
            self._verify(int(shard))
            rows = np.flatnonzero(shard_of == shard)
            local = starts[rows] - self.starts[shard]
            inside = local + length <= len(self.shards[shard])
            out[rows[inside]] = self.shards[shard][local[inside, None] + offsets]
            for row in rows[~inside]:
                out[row] = self.read(int(starts[row]), length)
        return out


def _open_split(
    dataset_dir: Path, shards: list[dict[str, Any]], key: str, dtype: np.dtype, redo: Callable[[], str]
) -> SplitTokens:
    """The shards named by each entry's `key` ("file", or a chat dataset's "mask_file") as one array."""
    try:
        files = [dataset_dir / shard[key] for shard in shards]
    except KeyError as ex:
        raise UserError(f"{dataset_dir / META_FILE} lists a shard without its {key}", redo()) from ex
    arrays = [open_shard(path, dtype, shard["tokens"], redo) for path, shard in zip(files, shards, strict=True)]
    return SplitTokens(arrays, files)


def _identity(path: Path) -> tuple[int, int]:
    """What tells a file apart from its replacement: (inode, size in bytes)."""
    stat = path.stat()
    return stat.st_ino, stat.st_size


def _allow_open_files(n_shards: int) -> None:
    """Each memory-mapped shard holds a file descriptor: raise the soft limit (often 1024) if needed."""
    try:
        import resource
    except ImportError:  # not on this platform (Windows): nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = n_shards + 256  # and room for everything else the process opens
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise UserError(
            f"the dataset has {n_shards} shards but this process may open only {hard} files",
            "raise the limit (`ulimit -n`), or prepare with a larger data.shard_tokens",
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class TokenDataset:
    """The train and val splits of one prepared dataset, memory-mapped once and shared by all loaders.

    Each shard is mapped a single time for the life of the dataset (no re-opening per batch, no handle
    growth); reads copy only the windows a batch needs. `prepare_command` gives the command that prepares
    the dataset, for the fix of an error about it.
    """

    def __init__(self, dataset_dir: Path, prepare_command: PrepareCommand) -> None:
        self.dir = dataset_dir
        self.meta = read_meta(dataset_dir, prepare_command)
        self.tokenizer: Tokenizer = tokenizer_from_description(self.meta.tokenizer)
        dtype = np.dtype(self.meta.dtype)
        redo = functools.partial(_redo, prepare_command)
        if self.tokenizer.vocab_size != self.meta.vocab_size or dtype != token_dtype(self.meta.vocab_size):
            raise UserError(
                f"{dataset_dir / META_FILE} is inconsistent: vocab {self.meta.vocab_size} stored as {dtype.name}, "
                f"tokenizer vocab {self.tokenizer.vocab_size}",
                redo(),
            )
        self.chat = self.meta.settings.get("format") == "chat"
        _allow_open_files(sum(len(shards) for shards in self.meta.shards.values()) * (2 if self.chat else 1))
        self.splits: dict[str, SplitTokens] = {}
        self.masks: dict[str, SplitTokens] = {}  # chat: 1 where a token is a target the loss counts
        self._conversations: dict[str, Conversations] = {}
        for split in SPLITS:
            shards = self.meta.shards.get(split, [])
            self.splits[split] = _open_split(dataset_dir, shards, "file", dtype, redo)
            if self.chat:
                self.masks[split] = _open_split(dataset_dir, shards, "mask_file", np.dtype(np.uint8), redo)
        for split, tokens in self.splits.items():
            head = tokens.shards[0][:4096] if tokens.shards else np.empty(0, dtype)
            if len(head) and int(head.max()) >= self.meta.vocab_size:
                raise UserError(
                    f"the {split} split of '{dataset_dir.name}' holds token id {int(head.max())}, outside its "
                    f"vocabulary of {self.meta.vocab_size}",
                    redo(),
                )

    def conversations(self, split: str) -> Conversations:
        """A chat dataset's split as documents and masks (found once, then kept)."""
        from hydragpt.data.chat import ChatTemplate
        from hydragpt.data.chat_batches import Conversations

        if split not in self._conversations:
            bos = ChatTemplate(self.tokenizer).bos
            self._conversations[split] = Conversations(self.splits[split], self.masks[split], bos)
        return self._conversations[split]

    def require_block(self, block_size: int, knob: str = "model.block_size") -> None:
        """Every split must hold at least one window of block_size inputs plus the next-token target;
        `knob` is the setting that shortens the block (train.crop_block_size for a run from weights).
        A chat dataset's rows are padded, so any conversation makes one."""
        if self.chat:
            return
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise UserError(
                    f"the {split} split of '{self.dir.name}' has {len(tokens)} tokens, fewer than one block "
                    f"(block_size + 1 = {block_size + 1})",
                    f"use a smaller {knob} or a larger corpus",
                )
