"""Fault injection for tests/test_faults.py: put this directory on PYTHONPATH and set the variables below.

Python imports `sitecustomize` at start-up, so a training process started by a test (or by torchrun) gets
these patches without any test hook in hydragpt itself.

- HYDRAGPT_TEST_PID_DIR: write this process's pid to <dir>/rank<RANK>.pid once training starts.
- HYDRAGPT_TEST_STEP_SLEEP: seconds to sleep in every training step (so a test can catch a run mid-way).
- HYDRAGPT_TEST_SLOW_FSYNC: seconds each fsync takes (so checkpoint writes are long enough to be hit).
- HYDRAGPT_TEST_POISON_AT: add inf to the training loss at this step (a poisoned batch).
- HYDRAGPT_TEST_STALL_RANK1_AT: rank 1 stops responding at this step (its peers block in a collective).
- HYDRAGPT_TEST_TRUNCATE_AT=<step>:<file>: cut <file> in half when this step starts (a shard changing).
- HYDRAGPT_TEST_DISK_FULL_AFTER: checkpoint writes after this many fail with ENOSPC half-way through.
"""

import os

if any(key.startswith("HYDRAGPT_TEST_") for key in os.environ):
    import errno
    import io
    import time
    from pathlib import Path

    import torch

    from hydragpt.engine import checkpoint, trainer
    from hydragpt.model import GPT

    current = {"step": -1, "saves": 0}
    train_step = trainer.Trainer.train_step

    def patched_train_step(self):
        if current["step"] < 0 and (pid_dir := os.environ.get("HYDRAGPT_TEST_PID_DIR")):
            (Path(pid_dir) / f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
        current["step"] = self.step
        truncate = os.environ.get("HYDRAGPT_TEST_TRUNCATE_AT", "")
        if truncate.startswith(f"{self.step}:"):
            path = Path(truncate.split(":", 1)[1])
            os.truncate(path, path.stat().st_size // 2)
        time.sleep(float(os.environ.get("HYDRAGPT_TEST_STEP_SLEEP", 0)))
        if os.environ.get("RANK") == "1" and os.environ.get("HYDRAGPT_TEST_STALL_RANK1_AT") == str(self.step):
            time.sleep(3600)  # rank 0 waits for it inside a collective, in native code
        return train_step(self)

    trainer.Trainer.train_step = patched_train_step

    forward = GPT.forward

    def patched_forward(self, idx, targets=None, cache=None, reduction="mean"):
        logits, loss = forward(self, idx, targets, cache, reduction)
        poison_at = os.environ.get("HYDRAGPT_TEST_POISON_AT")
        if loss is not None and torch.is_grad_enabled() and poison_at and current["step"] == int(poison_at):
            loss = loss + float("inf")
        return logits, loss

    GPT.forward = patched_forward

    if slow_fsync := float(os.environ.get("HYDRAGPT_TEST_SLOW_FSYNC", 0)):
        fsync = os.fsync

        def patched_fsync(fd):
            time.sleep(slow_fsync)
            return fsync(fd)

        checkpoint.os.fsync = patched_fsync  # the module object is `os` itself: every fsync is slowed

    if (full_after := os.environ.get("HYDRAGPT_TEST_DISK_FULL_AFTER")) is not None:
        save = torch.save

        def patched_save(obj, f, *args, **kwargs):
            if not isinstance(f, io.BufferedWriter):  # in-memory saves are no disk writes
                return save(obj, f, *args, **kwargs)
            if current["saves"] >= int(full_after):
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            current["saves"] += 1
            return save(obj, f, *args, **kwargs)

        checkpoint.torch.save = patched_save  # likewise torch itself: fine in a process that only trains
