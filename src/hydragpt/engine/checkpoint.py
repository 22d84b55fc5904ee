"""Checkpoints: one self-contained file per save, written atomically, loaded with weights_only=True.

A checkpoint holds everything needed to sample (weights, model config, tokenizer description) and to
resume exactly (run config, the identity of its data, optimizers, grad scaler, step, tokens seen, best val
loss, RNG states, data loader position). It is written to a temporary file, fsync'ed and renamed over the old one,
so a crash at any instant leaves either the previous or the new checkpoint, never a truncated file.
Retention (`checkpoint.keep_last`, `checkpoint.keep_every`) adds step_<N>.pt hard links beside last.pt.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydragpt.errors import UserError, in_chain

FORMAT = "hydragpt-checkpoint"
# 2: several optimizers (a list of states), no scheduler state (the lr is a function of the step)
VERSION = 4  # 3: "data", the dataset it trained on; 4: "train_seconds", the training time so far
CHECKPOINT_DIR = "checkpoints"
# What a checkpoint needs to sample, evaluate or start a new run from; and, beyond that, to be resumed.
MODEL_KEYS = ("model", "model_config", "tokenizer", "step")
RESUME_KEYS = (
    *MODEL_KEYS,
    *("config", "config_choices", "data", "optimizers", "scaler", "tokens_seen", "best_val_loss", "rng", "loader"),
)
# Keys that wrappers add to parameter names: torch.compile and DistributedDataParallel.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter names as the bare model has them, whatever wrapped it."""
    cleaned = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, in types that `weights_only` loading accepts."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.copy()), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy(), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with _disk_errors(path):
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, "version": VERSION, **state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make `dst` the same checkpoint as `src` without writing it twice (a hard link, atomically)."""
    tmp = _temporary(dst)
    tmp.unlink(missing_ok=True)
    try:
        with _disk_errors(dst):
            try:
                os.link(src, tmp)
            except OSError:  # file systems without hard links
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    while chunk := fin.read(1 << 24):
                        fout.write(chunk)
                    fout.flush()
                    os.fsync(fout.fileno())
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dst.parent)


def keep_step_checkpoint(saved: Path, step: int, keep_last: int, keep_every: int | None) -> None:
    """Retention: the checkpoint just `saved` also becomes step_<step>.pt when `keep_last` is set or
    `keep_every` divides the step; of the step checkpoints, the newest `keep_last` and those `keep_every`
    divides stay, the others go."""

    def permanent(n: int) -> bool:
        return keep_every is not None and n % keep_every == 0

    if keep_last == 0 and not permanent(step):
        return
    link_checkpoint(saved, saved.parent / f"step_{step}.pt")
    for n in step_checkpoints(saved.parent)[: -keep_last or None]:  # all but the newest keep_last
        if not permanent(n):
            (saved.parent / f"step_{n}.pt").unlink()


def step_checkpoints(ckpt_dir: Path) -> list[int]:
    """The steps of the step_<N>.pt files in `ckpt_dir`, in increasing order."""
    steps = (p.stem.removeprefix("step_") for p in ckpt_dir.glob("step_*.pt"))
    return sorted(int(n) for n in steps if n.isdigit())


def remove_partial_writes(ckpt_dir: Path) -> int:
    """Delete the temporary files of saves a killed process never finished; returns how many. Only safe
    while holding the run's lock (no other process may be writing one right now)."""
    leftovers = list(ckpt_dir.glob(".*.tmp-*")) if ckpt_dir.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Turn a failed write (typically a full disk) into a user error; the previous file is untouched.

    torch.save's zip writer often reports the file system's OSError as a RuntimeError ("unexpected pos"),
    with the OSError as its context: that is the same failure.
    """
    try:
        yield
    except (OSError, RuntimeError) as ex:
        cause = in_chain(ex, OSError)
        if cause is None:
            raise
        raise UserError(
            f"could not write checkpoint {path}: {cause.strerror or cause}",
            f"free disk space and run again: a checkpoint saved before this one is intact, and"
            f" resume={path.parent.parent} continues from it",
        ) from ex


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory or its checkpoints/ directory (meaning its last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p if p.name == CHECKPOINT_DIR and not (p / CHECKPOINT_DIR).is_dir() else p / CHECKPOINT_DIR
        # the later of last.pt and best.pt: with always_save_checkpoint=false, best.pt may be ahead
        candidates = [c for c in (folder / "last.pt", folder / "best.pt") if c.is_file()]
        if not candidates:
            raise UserError(f"no checkpoint in {folder}", "give a run directory that has saved one")
        return max(candidates, key=_saved_step)  # max keeps the first (last.pt) on a tie
    if not p.is_file():
        raise UserError(f"checkpoint '{path}' does not exist", "give the path of a .pt file or of a run directory")
    return p


def _saved_step(path: Path) -> int:
    """The step a checkpoint was saved at, read without loading its tensors into memory."""
    return load_checkpoint(path, mmap=True, require=("step",))["step"]


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    mmap: bool = False,
    require: tuple[str, ...] = MODEL_KEYS,
) -> dict[str, Any]:
    """Load and sanity-check a checkpoint that holds the `require`d keys; a missing, foreign, corrupt or
    incomplete file is a `UserError`."""
    p = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as ex:  # torch.load fails on foreign bytes with many exception types
        if isinstance(ex, MemoryError):
            raise
        raise UserError(
            f"{p} is not a readable hydragpt checkpoint ({type(ex).__name__})",
            "it may be truncated or not a checkpoint at all; use checkpoints/last.pt or best.pt of a run",
        ) from ex
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{p} is not a hydragpt checkpoint", "use checkpoints/last.pt or best.pt of a hydragpt run")
    if ckpt.get("version") != VERSION:
        raise UserError(
            f"{p} has checkpoint version {ckpt.get('version')}, this hydragpt reads version {VERSION}",
            "use the hydragpt release that wrote it, or train it again",
        )
    if missing := [key for key in require if key not in ckpt]:
        raise UserError(
            f"{p} is an incomplete hydragpt checkpoint (no {', '.join(missing)})",
            "use checkpoints/last.pt or best.pt of a run",
        )
    return ckpt


def load_weights(source: str) -> dict[str, Any]:
    """What a new run (`train.init_from`), sample.py and eval.py start from: a checkpoint or run directory,
    or a pretrained GPT-2 (`gpt2`, ..., `hf:<dir>`) as the parts of a checkpoint that hold the model."""
    from hydragpt.hf import is_pretrained, load_pretrained

    return load_pretrained(source) if is_pretrained(source) else load_checkpoint(source)
