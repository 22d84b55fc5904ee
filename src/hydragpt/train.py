"""What `scripts/train.py` runs: Hydra's config -> typed config -> Trainer, and `resume=<run dir>`.

Resuming continues a stopped run in its own directory. Its config is the one saved in the run's newest
checkpoint, with this command line's `key=value` overrides applied on top (max_iters, intervals, lr...);
overrides that would change the model's shape or the dataset are refused.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydragpt.data.identity import prepared_meta
from hydragpt.engine import distributed
from hydragpt.engine.builder import build_trainer
from hydragpt.engine.checkpoint import CHECKPOINT_DIR, RESUME_KEYS, load_checkpoint, remove_partial_writes
from hydragpt.engine.preemption import PREEMPTED_EXIT, StopSignals
from hydragpt.engine.run_lock import RunLock
from hydragpt.engine.trainer import Trainer
from hydragpt.errors import UserError, composition_error, exit_on_user_error
from hydragpt.model import GPTConfig
from hydragpt.train_config import OPTION_GROUPS, train_config

log = logging.getLogger("hydragpt.train")


def _run_dir(resume: str | None, fresh: str) -> str:
    if not resume:
        return fresh
    if not Path(resume).is_dir():
        raise UserError(
            f"resume={resume} is not a run directory", "give the run's directory, <paths.output_dir>/<date>/<time>"
        )
    return resume


# Resolvers used by conf/hydra/default.yaml: a resumed run writes into the directory it resumes, and
# keeps that directory's original .hydra/ record (`_record_config` updates it instead).
OmegaConf.register_new_resolver("hydragpt.run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver(
    "hydragpt.output_subdir", lambda resume, subdir: None if resume else subdir, replace=True
)

# conf/hydra/launcher/submitit_slurm.yaml deliberately replaces the submitit plugin's config of that name
# (with the same keys, one rank per GPU); Hydra checks it against the plugin's schema and says so.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema")

# Config keys a resumed run cannot change, and why: the saved state would not fit, or the key has done its
# work when the run started (a change would be recorded and ignored).
_SHAPE = "the saved weights and optimizer have the old shape"
FROZEN_ON_RESUME = {
    **{f"model.{f.name}": _SHAPE for f in fields(GPTConfig) if f.name not in ("name", "dropout")},
    "data.name": "the loader's position refers to the data the run trained on",
    "data.tokenizer": "the loader's position refers to the data the run trained on",
    "data.sampling": "the loader's position refers to the data the run trained on",
    "system.seed": "a resumed run restores its random state from the checkpoint",
    "train.init_from": "a resumed run continues from its own checkpoint",
    "train.crop_block_size": "a resumed run continues from its own checkpoint",
}


def apply_resume_overrides(saved: dict[str, Any], choices: dict[str, str], overrides: list[str]) -> dict[str, Any]:
    """The saved run config with this command line's `key=value` overrides (other than resume) applied.

    `choices` are the saved run's config-group selections: repeating one (`model=debug` when the run
    used debug) is fine, so the original command line plus `resume=` works; changing one is refused.
    """
    original = OmegaConf.create(saved)
    config = OmegaConf.create(saved)
    OmegaConf.set_struct(config, True)  # an unknown key is an error, not a new key
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as ex:
        raise UserError(f"bad override: {ex}", "use key=value") from ex
    for override in parsed:
        key = override.key_or_group
        if key == "resume" or (key in choices and str(override.value()) == choices[key]):  # lists: logger=[a,b]
            continue
        node = OmegaConf.select(config, key, default=None)
        if override.is_delete() or override.is_add() or isinstance(node, DictConfig):
            fix = "drop it"
            if key.split(".")[0] not in ("model", "data") and not override.is_add():  # a new run could take it
                fix += f", or start a new run with it and train.init_from={saved['resume']}"
            raise UserError(
                f"cannot apply '{override.input_line}' when resuming: only key=value changes of existing values are"
                " allowed (not config groups, + or ~)",
                fix,
            )
        try:
            OmegaConf.update(config, key, override.value(), merge=False)
        except OmegaConfBaseException as ex:
            reason = str(ex).splitlines()[0]
            raise UserError(f"cannot apply '{override.input_line}' when resuming: {reason}", "check the key") from ex
    result = OmegaConf.to_container(config, resolve=True)
    for key, why in FROZEN_ON_RESUME.items():
        before, after = OmegaConf.select(original, key), OmegaConf.select(config, key)
        if before != after:
            new_run = f"start a new run with train.init_from={saved['resume']} instead of resume"
            if why == _SHAPE:  # weights of one shape cannot start a model of another
                new_run = "train a model of that shape from scratch"
            raise UserError(
                f"resume cannot change {key} from {before} to {after}: {why}", f"drop that override, or {new_run}"
            )
    assert isinstance(result, dict)
    return result


def _record_config(run_dir: Path, config: dict[str, Any], more_overrides: list[str]) -> None:
    """Keep .hydra/ truthful: the config in force (a resumed run's, or the model shape a checkpoint
    brought), and the overrides of every invocation in order."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if more_overrides:
        overrides_file = hydra_dir / "overrides.yaml"
        previous = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        overrides_file.write_text(yaml.safe_dump([*(previous or []), *more_overrides]))


def _pinned_model_keys(hydra_cfg: DictConfig) -> dict[str, str]:
    """The model knobs this command line set, each with the override that set it: `model.<key>=...`, or
    every knob for `model=<flavour>`."""
    pinned = {}
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        group, _, key = override.key_or_group.partition(".")
        if group == "model":
            pinned.update({k: override.input_line for k in ([key] if key else [f.name for f in fields(GPTConfig)])})
    return pinned


def train(cfg: DictConfig) -> float:
    """Train as `cfg` says; returns the best val loss (what a Hydra sweeper minimizes).

    Under torchrun every rank runs this; rank 0's run directory is the job's, and the others learn it.
    Rank 0 holds the run directory's lock throughout. A run stopped by a signal exits with
    PREEMPTED_EXIT once its checkpoint is saved.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    lock = RunLock(run_dir)
    if distributed.launched_env().is_main:
        lock.acquire()  # before anything reads or writes the run (a resumed one may be in use)
    try:
        if lock.held:
            if not cfg.resume:  # checked before Hydra wrote anything too, unless HYDRA_FULL_ERROR skipped that
                _refuse_existing_run(run_dir)
            if removed := remove_partial_writes(run_dir / CHECKPOINT_DIR):
                log.info("removed %d unfinished checkpoint write(s) of an interrupted process", removed)
        trainer = _train(cfg, hydra_cfg)
    finally:
        lock.release()
    if trainer.stopped_by:
        sys.exit(PREEMPTED_EXIT)
    return trainer.best_val_loss


def _train(cfg: DictConfig, hydra_cfg: DictConfig) -> Trainer:
    run_config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(run_config, dict)
    resume_from = None
    if cfg.resume:
        resume_from = load_checkpoint(cfg.resume, require=RESUME_KEYS)
        overrides = list(hydra_cfg.overrides.task)
        # keys this version added since the run was saved take today's defaults; a component option is the
        # saved one whole (today's default option may be another class, whose keys it would not take)
        saved = OmegaConf.to_container(OmegaConf.merge(run_config, resume_from["config"]))
        assert isinstance(saved, dict)
        saved.update({key: resume_from["config"][key] for key in (*OPTION_GROUPS, "logger")})
        run_config = apply_resume_overrides({**saved, "resume": cfg.resume}, resume_from["config_choices"], overrides)
    typed = train_config(run_config, distributed.launched_env().world_size)
    # From here to the end the stop signals only raise a flag: one arriving while the job still sets up
    # stops it after its first step
    with StopSignals(typed.train.stop_signals).installed() as stop:
        env = distributed.launched_env()
        typed.ddp.setup(env, typed.system.device)
        distributed.quiet_other_ranks(env)
        trainer = None
        try:
            run_dir = Path(distributed.broadcast_object(hydra_cfg.runtime.output_dir))
            choices = resume_from["config_choices"] if resume_from else _group_choices(hydra_cfg)
            auto_batch = typed.train.batch_size == "auto"
            trainer = build_trainer(
                typed,
                run_dir,
                run_config,
                choices,
                resume_from=resume_from,
                env=env,
                stop=stop,
                pinned_model_keys=_pinned_model_keys(hydra_cfg),
            )
            # once it proved valid, and with what a checkpoint or batch_size=auto decided
            if env.is_main and (resume_from or typed.train.init_from != "scratch" or auto_batch):
                _record_config(run_dir, trainer.checkpointer.metadata["config"], overrides if resume_from else [])
            if resume_from:
                log.info("resuming %s from iter %d with overrides %s", run_dir, resume_from["step"], overrides)
            trainer.fit()
            return trainer
        finally:
            if trainer is not None:  # also when a traceback keeps the trainer alive
                trainer.unwrap()
            distributed.shutdown()


class ValidateConfigCallback(Callback):
    """Checks the config (and that its dataset is prepared, with its settings, and that the run directory is
    not an old run's) before Hydra creates the run directory, so a typo leaves no empty run behind.

    Registered in conf/hydra/default.yaml. A resumed run is checked later, against its saved config.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("resume"):
            task_config = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
            exit_on_user_error(lambda: train_config(task_config, distributed.launched_env().world_size))
            exit_on_user_error(lambda: _check_dataset(config))
            if distributed.launched_env().is_main:
                exit_on_user_error(lambda: _refuse_existing_run(Path(config.hydra.run.dir)))
        elif distributed.launched_env().is_main:
            exit_on_user_error(lambda: _refuse_moved_resume(config.resume, Path(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of a grid sweep composed before the sweep directory exists: an unknown key or a value
        of the wrong type in any job is one error line, and no sweep is left half made. (A search sweeper
        such as Optuna picks its values as it goes: its jobs are checked as they start.)"""
        if "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
            return
        parser = OverridesParser.create()
        jobs = BasicSweeper.split_arguments(parser.parse_overrides(list(config.hydra.overrides.task)), None)
        for number, overrides in enumerate(job for batch in jobs for job in batch):
            exit_on_user_error(lambda o=overrides: _check_job(config, o), f"job {number} ({' '.join(overrides)}): ")


def _check_dataset(config: DictConfig) -> None:
    """The dataset is prepared, and with the settings the config gives (meta.json alone: no shard is read)."""
    data = OmegaConf.to_container(config.data, resolve=True)
    assert isinstance(data, dict)
    prepared_meta(config.hydra.runtime.choices.get("data"), data, config.paths.data_dir)


def _check_job(config: DictConfig, overrides: list[str]) -> None:
    """A job's config composes: its keys exist and its values have their types. Values out of range fail
    that job alone, as a failed row of the sweep's summary, and the other jobs run."""
    try:
        compose(config.hydra.job.config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as ex:
        raise composition_error(ex) from ex


def _refuse_moved_resume(resume: str, run_dir: Path) -> None:
    """A resumed run continues in its own directory: `hydra.run.dir` elsewhere would fork it half-recorded."""
    if run_dir.resolve() != Path(resume).resolve():
        raise UserError(
            f"resume={resume} continues the run in its own directory, not in hydra.run.dir={run_dir}",
            f"drop hydra.run.dir, or start a new run from it there with train.init_from={resume}",
        )


def _refuse_existing_run(run_dir: Path) -> None:
    """A new run must not write over a finished or interrupted one (`hydra.run.dir=<old run>`)."""
    if any((run_dir / CHECKPOINT_DIR).glob("*.pt")):
        raise UserError(
            f"{run_dir} already holds a run with checkpoints",
            f"continue it with resume={run_dir}, or give the new run another hydra.run.dir",
        )


def _group_choices(hydra_cfg: DictConfig) -> dict[str, str]:
    """Which option of each config group this run composed (model: tiny_cpu, ...), Hydra's own aside.

    Hydra records no choice for a group given a list of options (`logger=[wandb,csv]`): those are taken
    from the command line, in the form `apply_resume_overrides` compares them in.
    """
    choices = {
        group: str(option)
        for group, option in hydra_cfg.runtime.choices.items()
        if option is not None and not group.startswith("hydra")
    }
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        if isinstance(override.value(), list) and "." not in override.key_or_group:
            choices.setdefault(override.key_or_group, str(override.value()))
    return choices
