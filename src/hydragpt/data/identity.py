"""Is this the dataset a run asks for? The settings it was prepared with, the fingerprint a checkpoint carries,
and the prepare.py command that makes the dataset a run asks for, so that each refusal's fix works when typed.

A run names its data by a group option (`data=shakespeare_char`) and `data.*` overrides; the command that
prepares it is that option plus each setting where the run's differs from the option's own.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hydragpt.config import DataConfig, PathsConfig
from hydragpt.data.dataset import (
    SPLITS,
    TOKEN_SETTINGS,
    DatasetMeta,
    PrepareCommand,
    TokenDataset,
    read_meta,
    setting_differences,
    token_settings,
)
from hydragpt.errors import UserError

YOUR_CORPUS = "<your corpus>"  # stands for a source the config leaves unset (data=text)


def prepare_command(choice: str | None, data: Mapping[str, Any], data_dir: str) -> str:
    """`python scripts/prepare.py data=<choice> ...` that prepares `data` (a DataConfig as a dict) under
    `data_dir`: each of its name, source and token settings that the option sets otherwise is added."""
    option, option_data = _option(choice)
    args = [f"data={option}"]
    for key in ("name", "source", *TOKEN_SETTINGS):
        value = data.get(key)
        if key == "source" and value is None:
            args.append(f"data.source={YOUR_CORPUS}")
        elif value != option_data.get(key):
            args.append(shlex.quote(f"data.{key}={_text(value)}"))
    if data_dir != PathsConfig().data_dir:
        args.append(shlex.quote(f"paths.data_dir={data_dir}"))
    return " ".join(["python scripts/prepare.py", *args])


def command_for(choice: str | None, data: Mapping[str, Any], data_dir: str) -> PrepareCommand:
    """`prepare_command` for these, derived only when called (an error's fix)."""
    return functools.partial(prepare_command, choice, dict(data), data_dir)


def _option(choice: str | None) -> tuple[str, dict[str, Any]]:
    """The data group option's own settings, as `prepare.py data=<choice>` composes them; `text` (which
    sets none of its own) when Hydra is not running or that option does not exist."""
    if choice and GlobalHydra.instance().is_initialized():
        try:
            data = compose("prepare", overrides=[f"data={choice}"]).data
            return choice, OmegaConf.to_container(data, resolve=True)  # type: ignore[return-value]
        except (HydraException, OmegaConfBaseException):
            pass
    return "text", asdict(DataConfig())


def _text(value: Any) -> str:
    """A config value as one writes it on the command line."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def another_name(name: str, asked: Mapping[str, Any]) -> str:
    """A dataset name for the settings `asked` (key -> value) beside dataset `name`: shakespeare_char_gpt2."""
    tags = [Path(_text(value)).stem if key == "source" else _text(value) for key, value in asked.items()]
    return "_".join([name, *(re.sub(r"[^A-Za-z0-9.]+", "-", tag).strip("-.") or "other" for tag in tags)])


def listed(settings: Mapping[str, Any]) -> str:
    """Settings as command-line overrides: `data.tokenizer=char data.val_fraction=0.2`."""
    return " ".join(f"data.{key}={_text(value)}" for key, value in settings.items())


def open_dataset(choice: str | None, data: Mapping[str, Any], data_dir: str, compare: bool = True) -> TokenDataset:
    """The prepared dataset that `data` names; with `compare`, it must have been prepared with its settings."""
    dataset = TokenDataset(Path(data_dir) / data["name"], command_for(choice, data, data_dir))
    if compare:
        require_settings(dataset.meta, choice, data, data_dir)
    return dataset


def prepared_meta(choice: str | None, data: Mapping[str, Any], data_dir: str) -> DatasetMeta:
    """The meta.json of the dataset that `data` names, prepared with its settings (no shard is opened)."""
    meta = read_meta(Path(data_dir) / data["name"], command_for(choice, data, data_dir))
    require_settings(meta, choice, data, data_dir)
    return meta


def require_settings(meta: DatasetMeta, choice: str | None, data: Mapping[str, Any], data_dir: str) -> None:
    """A dataset prepared with other token settings than `data` asks for is not the data the run's config
    describes: refused, with the two ways out (where it came from, data.source, is not compared)."""
    differences = setting_differences(meta.settings, token_settings(data), TOKEN_SETTINGS)
    if not differences:
        return
    prepared = {key: meta.settings.get(key) for key in differences}
    asked = {key: data.get(key) for key in differences}
    another = another_name(data["name"], asked)
    source = meta.settings.get("source") or data.get("source")  # the corpus it came from, e.g. a local copy
    command = prepare_command(choice, {**data, "name": another, "source": source}, data_dir)
    raise UserError(
        f"{Path(data_dir) / data['name']} was prepared with {listed(prepared)}, not {listed(asked)} as asked",
        f"ask for it as prepared ({listed(prepared)}), or prepare what you ask for as another dataset and give"
        f" data.name={another}: {command}",
    )


def data_identity(name: str, meta: DatasetMeta) -> dict[str, Any]:
    """What a checkpoint records of the data it trained on: a resumed run and eval.py check it."""
    return {"name": name, "fingerprint": meta.fingerprint, "tokens": dict(meta.tokens)}


def other_data(trained_on: Mapping[str, Any] | None, meta: DatasetMeta) -> str | None:
    """How the dataset `meta` describes differs from the one a checkpoint `trained_on` (its data identity):
    None when they are the same, or when the checkpoint has none (a pretrained import: nothing to check)."""
    if trained_on is None or trained_on["fingerprint"] == meta.fingerprint:
        return None
    then, now = trained_on["tokens"], meta.tokens
    counts = [f"{s} {then.get(s, 0):,} tokens then, {now.get(s, 0):,} now" for s in SPLITS if then.get(s) != now.get(s)]
    return "; ".join(counts) or "as many tokens, other ones"
