"""Figures Linux keeps under /proc, read without importing torch (the benchmarks' harness runs without it)."""

from __future__ import annotations

from pathlib import Path


def proc_kib_field(path: Path, key: str) -> int | None:
    """Bytes of a `key:  N kB` line of a /proc file (meminfo, a process's status), or None where the file
    (Linux only; a process that ended) or the line is missing."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) * 1024
    return None
