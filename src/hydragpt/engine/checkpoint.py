"""Checkpoints: one self-contained file per save, written atomically, loaded with weights_only=True.

A checkpoint holds everything needed to sample (weights, model config, tokenizer description) and to
resume exactly (run config, optimizer, scheduler, grad scaler, step, tokens seen, best val loss, RNG
states, data loader position). It is written to a temporary file, fsync'ed and renamed over the old one,
so a crash at any instant leaves either the previous or the new checkpoint, never a truncated file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydragpt.errors import UserError

FORMAT = "hydragpt-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as ex:  # typically a full disk: the previous checkpoint is untouched
        raise UserError(
            f"could not write checkpoint {path}: {ex.strerror or ex}",
            "free disk space or move paths.output_dir; the previous checkpoint is intact",
        ) from ex
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make `dst` the same checkpoint as `src` without writing it twice (a hard link, atomically)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (meaning its checkpoints/last.pt)."""
    p = Path(path).expanduser()
    if p.is_dir():
        # the later of last.pt and best.pt: with always_save_checkpoint=false, best.pt may be ahead
        candidates = [c for c in (p / CHECKPOINT_DIR / "last.pt", p / CHECKPOINT_DIR / "best.pt") if c.is_file()]
        if not candidates:
            raise UserError(f"no checkpoint in {p / CHECKPOINT_DIR}", "give a run directory that has saved one")
        return max(candidates, key=_saved_step)  # max keeps the first (last.pt) on a tie
    if not p.is_file():
        raise UserError(f"checkpoint '{path}' does not exist", "give the path of a .pt file or of a run directory")
    return p


def _saved_step(path: Path) -> int:
    """The step a checkpoint was saved at, read without loading its tensors into memory."""
    return load_checkpoint(path, mmap=True)["step"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load and sanity-check a checkpoint; a missing, foreign or corrupt file is a `UserError`."""
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
        raise UserError(f"{p} has checkpoint version {ckpt.get('version')}, expected {VERSION}", "upgrade hydragpt")
    return ckpt
