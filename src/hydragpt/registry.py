"""Config schemas of the component groups: each option of optim, lr, ddp and logger is a dataclass that
holds its knobs (type, default, one-line doc) and builds the component.

`@option("optim", "muon")` makes the class a dataclass with a `_target_` field naming it (so a saved or
printed config says which class it builds, as in Hydra's `instantiate`), and stores it in Hydra's
ConfigStore as `schema/optim/muon`. conf/optim/muon.yaml extends that schema
(`defaults: [/schema/optim/muon@_here_]`) and sets only the values it changes. Composing `optim=muon` then
yields a typed node: Hydra refuses a wrong type or an unknown key on the command line, and converting it
(`hydragpt.train_config.train_config`) runs the class's own checks (`__post_init__`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


def option(group: str, name: str) -> Callable[[type[Any]], type[Any]]:
    """Register the decorated class as option `name` of config group `group` (and make it a dataclass)."""

    def register(cls: type[Any]) -> type[Any]:
        cls.__annotations__ = {**inspect.get_annotations(cls), "_target_": "str"}
        cls._target_ = f"{cls.__module__}.{cls.__qualname__}"  # the last field: it has a default
        schema = dataclass(cls)
        ConfigStore.instance().store(group=f"schema/{group}", name=name, node=schema)
        return schema

    return register
