"""`hydra/launcher=torchrun`: every job of a multirun is its own torchrun job, so a sweep's jobs can each
use several devices (`-m hydra/launcher=torchrun hydra.launcher.nproc_per_node=8 optim.lr=1e-3,3e-4`).

Jobs run one after another. For each, this launcher does what Hydra's basic launcher does (job number,
job directory, .hydra/ record, callbacks such as the sweep summary) and, as the job itself, starts
`torchrun scripts/train.py <the job's overrides> hydra.run.dir=<its directory>`: all ranks of the job then
share that directory, as in any torchrun run. A failed job is a failed row of the summary, with the
error its ranks printed, and the sweep goes on. Each job returns its best val loss, so a sweeper that
optimizes (Optuna) works with it too.

This module is imported by Hydra's plugin discovery at every start-up: it imports nothing heavy.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

ERROR_PREFIX = "error: "


# Hydra overrides the sweep owns (launcher, sweeper, where and how jobs run): not passed to a job's torchrun.
SWEEP_ONLY = ("hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper", "hydra.sweep", "hydra.mode")
SWEEP_ONLY += ("hydra.run", "hydra.output_subdir", "hydra.job.num", "hydra.job.id")
# What torchrun's --nproc-per-node takes besides a number.
NPROC_NAMES = ("auto", "gpu", "cpu")


class TorchrunLauncher(BasicLauncher):
    def __init__(self, nproc_per_node: int | str, extra_args: Sequence[str] = ()) -> None:
        super().__init__()
        self.nproc_per_node = nproc_per_node
        self.extra_args = list(extra_args)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydragpt.errors import user_errors_exit  # a failed job logs its error line and the sweep goes on

        super().setup(hydra_context=hydra_context, task_function=user_errors_exit(self._run_job), config=config)
        self.script = Path(sys.argv[0]).resolve()  # now: with hydra.job.chdir=true each job changes directory
        args = get_args_parser().parse_known_args(sys.argv[1:])[0]
        self.config_options = [
            f"--{option}={value}"
            for option, value in (
                ("config-path", args.config_path),
                ("config-dir", args.config_dir),
                ("config-name", args.config_name),
            )
            if value is not None
        ]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        nproc = self.nproc_per_node
        if not (nproc in NPROC_NAMES or (isinstance(nproc, int) and nproc >= 1)):
            from hydragpt.errors import UserError

            raise UserError(
                f"hydra.launcher.nproc_per_node must be a positive number or one of {', '.join(NPROC_NAMES)}, got"
                f" {nproc!r}",
                "e.g. hydra.launcher.nproc_per_node=8, one per GPU",
            )
        return super().launch(job_overrides, initial_job_idx)

    def _run_job(self, cfg: DictConfig) -> Any:
        """Runs in place of the task function: the job's own torchrun, in the directory Hydra made for it."""
        from hydragpt.config import STOPPABLE_SIGNALS
        from hydragpt.engine.preemption import PREEMPTED_EXIT
        from hydragpt.errors import UserError, user_environment
        from hydragpt.sweep import best_val_loss, override_key

        hydra_cfg = HydraConfig.get()
        job_dir = Path(hydra_cfg.runtime.output_dir)
        hydra_overrides = [o for o in hydra_cfg.overrides.hydra if not override_key(o).startswith(SWEEP_ONLY)]
        command = [
            sys.executable,
            "-m",
            "hydra_plugins.hydragpt_launcher.agent",  # torchrun, minus its traceback
            "--standalone",
            f"--nproc-per-node={self.nproc_per_node}",
            *self.extra_args,
            str(self.script),
            *self.config_options,
            *hydra_cfg.overrides.task,
            *hydra_overrides,
            f"hydra.run.dir={_quoted(job_dir)}",
            "hydra.output_subdir=null",  # .hydra/ is already written, with the sweep's view of the job
        ]
        # torchrun (2.9 and later; older ones ignore it) forwards SLURM's advance signals to the ranks too,
        # rather than die of them (any that train.stop_signals may name)
        environment = {**user_environment(), "TORCHELASTIC_SIGNALS_TO_HANDLE": ",".join(STOPPABLE_SIGNALS)}
        first_error = ""
        with subprocess.Popen(
            command, stderr=subprocess.PIPE, text=True, bufsize=1, env=environment, cwd=hydra_cfg.runtime.cwd
        ) as job:
            assert job.stderr is not None
            for line in job.stderr:  # passed through, and the ranks' error line kept for the summary
                sys.stderr.write(line)
                if line.startswith(ERROR_PREFIX) and not first_error:
                    first_error = line[len(ERROR_PREFIX) :].strip()
        if job.returncode == PREEMPTED_EXIT:
            raise UserError(
                f"job {hydra_cfg.job.num} was stopped by a signal after saving a checkpoint",
                f"continue it with `torchrun --nproc_per_node={self.nproc_per_node} {self.script} resume={job_dir}`",
            )
        if job.returncode != 0:
            raise UserError(
                f"job {hydra_cfg.job.num} failed: {first_error or f'torchrun exited with status {job.returncode}'}",
                f"its log: {job_dir / 'train.log'}",
            )
        return best_val_loss(job_dir)


def _quoted(path: Path) -> str:
    """A path as a Hydra override value: quoted, so spaces and special characters survive."""
    escaped = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
