"""Peak memory of a process and all its children (a worker pool counts as one job), on Linux.

Memory is the proportional set size (PSS): pages shared between a parent and its forked workers are
split among them rather than counted once per process, so the sum over the tree is the job's real use.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hydragpt.errors import user_environment
from hydragpt.procfs import proc_kib_field


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the thread or process ended meanwhile
            continue
    return found


def _memory_bytes(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Pss", "Rss"):
                found[key] = int(value.split()[0]) * 1024
    except OSError:  # the process ended meanwhile
        pass
    return found.get("Pss", 0), found.get("Rss", 0)


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) bytes summed over `pid` and every descendant, now; the RSS sum counts shared pages
    once per process, so it overstates what a forked pool really uses."""
    pss = rss = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        process_pss, process_rss = _memory_bytes(current)
        pss, rss = pss + process_pss, rss + process_rss
        stack += _children(current)
    return pss, rss


def tree_rss_high_water(pid: int) -> tuple[int]:
    """The peak RSS (the kernel's high-water mark) of `pid` and every descendant, summed, in bytes.

    Cheap to read, unlike smaps_rollup: reading that walks the process's page tables under its memory
    map lock, which stalls a training process's own allocations and slowed one measurably when read
    every 50 ms on two cores."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += proc_kib_field(Path(f"/proc/{current}/status"), "VmHWM") or 0  # 0: it ended meanwhile
        stack += _children(current)
    return (total,)


def run_measured(
    command: list[str],
    measure: Callable[[int], tuple[int, ...]] = tree_memory,
    interval: float = 0.05,
) -> tuple[subprocess.CompletedProcess, float, tuple[int, ...]]:
    """Run `command`; returns (result, wall seconds, the peak of each figure `measure(pid)` gives of its
    process tree, read every `interval` seconds: by default (PSS, RSS) bytes)."""
    peaks: tuple[int, ...] = ()
    start = time.perf_counter()
    env = user_environment()  # the child reports its own errors in one line, as a user would see them
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample() -> None:
        nonlocal peaks
        while not done.is_set():
            now = measure(process.pid)
            peaks = tuple(max(pair) for pair in zip(peaks, now, strict=True)) if peaks else now
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peaks = peaks or measure(process.pid)  # the process ended before a first reading: zeros
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), seconds, peaks


def last_error(result: subprocess.CompletedProcess) -> str:
    """What a failed script said last (its one `error:` line, without the prefix)."""
    return (result.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
