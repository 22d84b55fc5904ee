"""One training process per run directory: `<run dir>/.lock`, held while a run trains in it.

Two processes writing one run (a second `resume=` of a directory still training) would interleave their
checkpoints and metrics. The lock is an advisory `flock`, which the kernel drops when its holder dies in
any way (kill -9 included), so a lock file left by a killed process is stale by construction: the next
run takes it over and says so. The file names its holder (host, pid, start time) for the error message.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from pathlib import Path

from hydragpt.errors import UserError

log = logging.getLogger("hydragpt.train")

LOCK_FILE = ".lock"
# Errors of file systems that do not implement locks (some network mounts): train unlocked, with a warning.
_NO_LOCKS = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Exclusive use of a run directory; `release()` (or process exit) gives it up."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (not when the platform or file system has no locks)."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        if os.name != "posix":  # flock is POSIX only
            return self
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use: {holder} is training in it",
                "wait for that run to end or stop it; if no such process exists (a lock kept by a network file"
                f" system after a node failure), delete {self.path}",
            ) from None
        except OSError as ex:
            os.close(fd)
            if ex.errno not in _NO_LOCKS:
                raise
            log.warning("cannot lock %s (%s): make sure no other process trains in it", self.path, ex.strerror)
            return self
        stale = os.read(fd, 4096).decode(errors="replace").strip()
        if stale:
            log.warning("taking over the stale lock of %s, which stopped without releasing it", stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder().encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the file and unlock; the file stays, so a waiting opener never locks a deleted inode."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _holder() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()} (since {started})"
