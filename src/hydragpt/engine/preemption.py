"""Preemption: a stop signal ends training at the next step boundary, with a checkpoint, instead of mid-write.

Clusters warn before they take a job away: SLURM sends SIGTERM (or, with `--signal`, SIGUSR1/SIGUSR2 some
time ahead), a user presses Ctrl-C (SIGINT). While training runs, the signals in `train.stop_signals` only
raise a flag; the trainer finishes the optimizer step it is in, agrees with the other ranks on stopping
(see `Trainer.train_step`), saves `last.pt` and the process exits with `PREEMPTED_EXIT`. A second signal
means "now": the process dies at once from it, as if no handler were installed. Checkpoints are written
atomically, so even that leaves the previous one loadable.
"""

from __future__ import annotations

import os
import signal
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
        """Handle the signals inside the block; the previous handlers come back after it."""
        previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only flags here: logging or printing from a signal handler can re-enter an I/O call mid-write.
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signal.Signals(signum).name, now
        elif now - self._first_at > REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
