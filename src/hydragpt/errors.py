"""User-facing errors and the CLI wrapper that turns them into one `error:` line.

A user mistake (bad config value, missing file, bad prompt) raises `UserError`; the scripts' entry point
prints `error: <what> (<how to fix>)` on stderr and exits with status 2, with no traceback. Anything else
is a bug in hydragpt and keeps its traceback. `HYDRA_FULL_ERROR=1` shows the traceback for both.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

USER_ERROR_EXIT = 2
Failure = TypeVar("Failure", bound=BaseException)
# Lines of Hydra/OmegaConf messages that only add noise to a one-line error.
_HYDRA_NOISE = (
    "full_key:",
    "object_type=",
    "Config search path",
    "To append to your config",
    "reference_type=",
    "provider=",
    "To append to your default list",  # `+group=option`: no script takes a group it does not list
)
# Hydra messages whose fix we know better than a generic pointer: what the first line says, and the fix.
_HYDRA_FIXES = {
    "No match in the defaults list": "this script has no such config group: `--cfg job` prints the keys it takes",
}


# ValueErrors that are the user's to fix, raised by Hydra's command-line parser (`-m --cfg job`) and by
# Optuna when every trial of a search failed: how each message starts, and how to fix it.
_USER_VALUE_ERRORS = {
    "Only one of --run, --multirun": "drop all but one: `--cfg job` prints a config without running, `-m` sweeps",
    "No trials are completed yet": "every trial failed: summary.md at the sweep root and each job's train.log say why",
}


# A search sweeper turns `key=interval(...)`, `choice(...)` and `tag(log, ...)` into its distributions, and
# refuses bad ones (low >= high, a log range reaching 0) with a ValueError from these modules.
_SEARCH_SPACE_MODULES = ("optuna.", "hydra_plugins.hydra_optuna_sweeper")
_SEARCH_SPACE_FIX = (
    "search over interval(low, high) with low < high (and low > 0 inside tag(log, ...)), choice(a, b, ...) or"
    " range(start, stop, step); e.g. 'optim.lr=tag(log, interval(1e-4, 1e-2))'"
)


def _raised_in(ex: BaseException, modules: tuple[str, ...]) -> bool:
    """Whether the innermost frame of `ex`'s traceback is in one of `modules` (names or their prefixes)."""
    tb = ex.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return name.startswith(modules)


class UserError(Exception):
    """A mistake the user can fix: `what` went wrong and `fix` says how to fix it."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what} ({fix})")
        self.what = what
        self.fix = fix

    def __reduce__(self) -> tuple[type[UserError], tuple[str, str]]:
        # raised in data-preparation worker processes and pickled back to the parent
        return type(self), (self.what, self.fix)


def _full_error_wanted() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR", "") not in ("", "0")


# The user's own HYDRA_FULL_ERROR choice, read before run_cli sets the variable for Hydra's sake.
_user_wants_traceback = _full_error_wanted()


# How long a rank other than 0 waits before exiting on a user error: torchrun stops every rank as soon as
# one exits, and rank 0, which meets the same error as a rule, must have printed its line by then.
RANK_ZERO_GRACE_S = 10.0


def _exit_with(message: str, same_on_every_rank: bool = True) -> NoReturn:
    """Print the one `error:` line and exit 2. Under torchrun only rank 0 prints a config error, which
    every rank finds alike; an error found while running is also printed by the other ranks that meet
    it, tagged `[rank N]`."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        if not same_on_every_rank:
            print(f"[rank {rank}] error: {message}", file=sys.stderr, flush=True)
        time.sleep(RANK_ZERO_GRACE_S)  # torchrun stops this rank once rank 0 has reported and exited
    sys.exit(USER_ERROR_EXIT)


def fail(error: UserError) -> NoReturn:
    """Report a user error found before Hydra starts (command-line checks) the same way as any other."""
    if _full_error_wanted():
        raise error
    _exit_with(str(error))


def exit_on_user_error(check: Callable[[], Any], prefix: str = "") -> None:
    """Run `check` where Hydra swallows exceptions (its callbacks): a `UserError` exits at once, its line
    starting with `prefix`.

    With HYDRA_FULL_ERROR=1 the check is skipped, so the same mistake surfaces later with its traceback.
    """
    if _user_wants_traceback:
        return
    try:
        check()
    except UserError as ex:
        _exit_with(prefix + str(ex))


def composition_error(ex: HydraException | OmegaConfBaseException) -> UserError:
    """A config that failed to compose (bad override, unknown key, wrong type) as a user error."""
    what, _, fix = _one_line(ex).partition(" (")
    return UserError(what, fix.removesuffix(")"))


def _file_system_error(ex: OSError) -> UserError:
    """The file system refused: an unwritable or missing directory, a file where a directory should be, a
    full disk. The user's to fix, so one line rather than a traceback."""
    where = f": {ex.filename}" if ex.filename else ""
    return UserError(
        f"{ex.strerror or ex}{where}",
        "check that path (out=, paths.output_dir, paths.data_dir), its permissions and free space",
    )


# How torch says an allocation failed: CPU's allocator, and CUDA's (torch.OutOfMemoryError).
_OUT_OF_MEMORY = ("can't allocate memory", "out of memory")


def _user_error(ex: BaseException) -> UserError:
    """What the user can fix about `ex`: a UserError itself, a file-system refusal, or a lack of memory."""
    if isinstance(ex, UserError):
        return ex
    return _file_system_error(ex) if isinstance(ex, OSError) else _memory_error(ex)


def _out_of_memory(ex: BaseException) -> bool:
    return isinstance(ex, MemoryError) or any(marker in str(ex) for marker in _OUT_OF_MEMORY)


# What to lower when a script runs out of memory, by its config's name.
_MEMORY_FIXES = {
    "train": "lower train.batch_size (train.grad_accum_steps keeps the tokens per step) or the model's size",
    "sample": "lower num_samples or max_new_tokens, or use device=cpu",
    "eval": "lower batch_size, or use device=cpu",
    "prepare": "lower workers or task_mb",
    "bench_prepare": "lower workers or task_mb",
    "bench_sample": "lower num_samples or max_new_tokens",
}


def _memory_error(ex: BaseException) -> UserError:
    """The device ran out of memory: the sizes the user chose are too large for it."""
    detail = (str(ex).strip().splitlines() or [type(ex).__name__])[0]
    script = HydraConfig.get().job.config_name if HydraConfig.initialized() else ""
    return UserError(
        f"out of memory: {detail.rpartition('DefaultCPUAllocator: ')[2].partition('. Error code')[0]}",
        _MEMORY_FIXES.get(script, "free memory, or ask for less work"),
    )


def _blocks(lines: list[str]) -> list[list[str]]:
    """Split message lines into blocks: a "Header:" line with the items below it, or a lone line."""
    blocks: list[list[str]] = []
    for line in lines:
        if blocks and blocks[-1][0].endswith(":") and not line.endswith(":"):
            blocks[-1].append(line)
        else:
            blocks.append([line])
    return blocks


_QUOTE_FIX = "quote a value with spaces or symbols, e.g. \"start='What? (no)'\""


def _one_line(ex: BaseException) -> str:
    """Hydra's and OmegaConf's messages span several lines: keep the first as the "what" and fold the
    useful rest (the cause, "Available options in 'model': a, b, c") into the parenthesis."""
    if isinstance(ex, OverrideParseException):
        return f"cannot parse the override '{ex.override}' ({_QUOTE_FIX})"
    text = str(ex)
    if isinstance(ex.__cause__, OmegaConfBaseException):
        text += "\n" + str(ex.__cause__)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"{type(ex).__name__} (run with HYDRA_FULL_ERROR=1 for details)"
    if fix := next((fix for says, fix in _HYDRA_FIXES.items() if says in lines[0]), None):
        return f"{lines[0]} ({fix})"
    details: list[str] = []
    for block in _blocks(lines[1:]):
        header, items = block[0], block[1:]
        if header.startswith(_HYDRA_NOISE):
            continue
        details.append(f"{header} {', '.join(items)}" if items else header)
    details.append("`--cfg job` shows the composed config")
    return f"{lines[0]} ({'; '.join(details)})"


def in_chain(ex: BaseException | None, kind: type[Failure]) -> Failure | None:
    """The first exception of type `kind` in `ex`'s chain of causes and contexts, `ex` itself included."""
    while ex is not None and not isinstance(ex, kind):
        ex = ex.__cause__ or ex.__context__
    return ex


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def user_errors_exit(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Hydra task function: a `UserError` raised inside (or the file system's refusal, or a lack of
    memory for the sizes asked) becomes the `error:` line and exit 2.

    It exits from inside the task (SystemExit passes through Hydra untouched), so Hydra adds no
    "Error executing job" banner to the one line. In a multirun the job fails instead, after logging
    the line: Hydra records it and goes on with the other jobs, and the sweep ends with that error.
    """

    @functools.wraps(task)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except (UserError, OSError, MemoryError, RuntimeError) as ex:
            if _user_wants_traceback or (isinstance(ex, RuntimeError) and not _out_of_memory(ex)):
                raise
            error = _user_error(ex)
            if not _in_multirun():
                _exit_with(str(error), same_on_every_rank=False)
            logging.getLogger("hydragpt").error("error: %s", error)
            if error is ex:
                raise
            raise error from ex

    return wrapped


def user_environment() -> dict[str, str]:
    """The environment as the user set it, for processes a script starts (torchrun per sweep job):
    `run_cli` sets HYDRA_FULL_ERROR for its own process only."""
    env = dict(os.environ)
    if not _user_wants_traceback:
        env.pop("HYDRA_FULL_ERROR", None)
    return env


def run_cli(hydra_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` function so that config-composition mistakes also give one `error:` line.

    Hydra prints composition errors (unknown config option, bad override) over several lines itself
    unless HYDRA_FULL_ERROR is set; we set it so they reach us, and restore the user's choice of a
    full traceback when they set it themselves.
    """
    global _user_wants_traceback
    _user_wants_traceback = _full_error_wanted()
    if _user_wants_traceback:
        hydra_main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except UserError as ex:
        _exit_with(str(ex))
    except (HydraException, OmegaConfBaseException) as ex:  # before OSError: a missing config is an IOError too
        cause = in_chain(ex, UserError)  # e.g. raised by one of our resolvers while Hydra composed
        _exit_with(str(cause) if cause else _one_line(ex))
    except OSError as ex:
        _exit_with(str(_file_system_error(ex)))
    except ValueError as ex:
        fix = next((fix for start, fix in _USER_VALUE_ERRORS.items() if str(ex).startswith(start)), None)
        if fix is None and _raised_in(ex, _SEARCH_SPACE_MODULES):
            fix = _SEARCH_SPACE_FIX
        if fix is None:
            raise
        _exit_with(f"{ex} ({fix})")
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)
