"""Peak memory of a process and all its children (a worker pool counts as one job), on Linux.

Memory is the proportional set size (PSS): pages shared between a parent and its forked workers are
split among them rather than counted once per process, so the sum over the tree is the job's real use.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from hydragpt.errors import user_environment


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


def run_measured(
    command: list[str], interval: float = 0.05
) -> tuple[subprocess.CompletedProcess, float, tuple[int, int]]:
    """Run `command`; returns (result, wall seconds, peak (PSS, RSS) bytes of its process tree)."""
    peak_pss = peak_rss = 0
    start = time.perf_counter()
    env = user_environment()  # the child reports its own errors in one line, as a user would see them
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_rss
        while not done.is_set():
            pss, rss = tree_memory(process.pid)
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), seconds, (peak_pss, peak_rss)


def last_error(result: subprocess.CompletedProcess) -> str:
    """What a failed script said last (its one `error:` line, without the prefix)."""
    return (result.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
