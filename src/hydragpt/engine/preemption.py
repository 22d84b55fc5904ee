"""Preemption: a stop signal ends training at the next step boundary, with a checkpoint, instead of mid-write.

Clusters warn before they take a job away: SLURM sends SIGTERM (or, with `--signal`, SIGUSR1/SIGUSR2 some
time ahead), a user presses Ctrl-C (SIGINT). While training runs, the signals in `train.stop_signals` only
raise a flag; the trainer finishes the optimizer step it is in, agrees with the other ranks on stopping
(see `Trainer.train_step`), saves `last.pt` and the process exits with `PREEMPTED_EXIT`. A second signal
means "now": the process exits at once with status 128 + the signal's number. Checkpoints are written
atomically, so even that leaves the previous one loadable.

Python runs signal handlers only between bytecodes of the main thread, so a process blocked in native
code (a collective waiting for a dead peer, a long kernel) would hear neither signal. The signals are
therefore watched from a thread, through `signal.set_wakeup_fd`, which sees each one as it arrives.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

# The exit status of a run stopped by a signal after saving its checkpoint: EX_TEMPFAIL ("try again
# later"), distinct from success (0), a crash (1) and a user error (2). `resume=<run dir>` continues it.
PREEMPTED_EXIT = 75
# One signal can arrive twice in quick succession: SLURM signals every process of a job step, and torchrun
# also forwards what it receives to its workers. A repeat within this many seconds is that, not a user
# insisting.
REPEAT_WINDOW_S = 1.0


class StopSignals:
    """Catches the stop signals while installed; `received` names the first one (None until then)."""

    def __init__(self, names: list[str]) -> None:
        self.signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
        self.received: str | None = None
        self._first_at = 0.0

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Watch the signals inside the block; the previous handlers come back after it. Only the main
        thread may install signal handlers: elsewhere this watches nothing."""
        if not self.signals or threading.current_thread() is not threading.main_thread():
            yield self
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = {sig: signal.signal(sig, _heard_by_the_watcher) for sig in self.signals}
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        watcher = threading.Thread(target=self._watch, args=(read_fd,), name="stop-signals", daemon=True)
        watcher.start()
        try:
            yield self
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(write_fd)  # ends the watcher's read
            watcher.join()
            os.close(read_fd)

    def _watch(self, read_fd: int) -> None:
        wanted = {int(sig) for sig in self.signals}
        while data := os.read(read_fd, 64):
            for signum in data:  # one byte per signal, also for signals this class does not watch
                if signum in wanted:
                    self._heard(signum)

    def _heard(self, signum: int) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, now
        elif now - self._first_at > REPEAT_WINDOW_S:
            os._exit(128 + signum)  # the shell's status for "killed by this signal"


def _heard_by_the_watcher(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler does nothing: installing it keeps the default action (death) away, and
    the watcher thread, woken through the wakeup fd, acts."""
