"""Every leaf knob of every script's config, tried with values of the wrong type and out of range: each is
refused while the config is composed, with one `error:` line that names the knob and says how to fix it.

The knobs are enumerated from the composed configs (train.py's with every option of its component groups),
and the bad values derive from each knob's type, so a new knob is covered without editing this test. Only
free text (names, paths, prompts: any string is a value) has no out-of-range string to try.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException
from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, Node, StringNode

from hydragpt import config
from hydragpt.bench.time_to_loss import bench_time_to_loss_config
from hydragpt.bench.train import bench_train_config
from hydragpt.errors import UserError, composition_error
from hydragpt.train_config import OPTION_GROUPS, bench_sample_config, train_config
from tests.helpers import CONF_DIR, compose_config

# What a script checks when its config is composed, and the overrides a valid config needs.
SCRIPTS: dict[str, tuple[Callable[[DictConfig], Any], list[str]]] = {
    "train": (train_config, []),
    "sample": (config.sample_config, []),
    "eval": (config.eval_config, []),
    "prepare": (config.prepare_config, []),
    "peek": (config.peek_config, []),
    "export": (config.export_config, ["out=exported"]),
    "plot": (config.plot_config, ["run=outputs/run"]),
    "report": (config.report_config, ["run=."]),
    "train_tokenizer": (config.train_tokenizer_config, []),
    "bench_prepare": (config.bench_prepare_config, []),
    "bench_sample": (bench_sample_config, []),
    "bench_time_to_loss": (bench_time_to_loss_config, []),
    "bench_train": (bench_train_config, []),
}
# Knobs whose every string is a value: names, paths, URLs, prompts, labels.
FREE_TEXT = {
    "name",
    "runs",  # train.py overrides, composed when the benchmark starts
    "source",
    "hf_name",
    "hf_split",
    "text_field",
    "data_dir",
    "output_dir",
    "path",
    "url",
    "init_from",
    "sample_start",
    "resume",
    "ckpt",
    "start",
    "stop",
    "out",
    "dataset",
    "run",
    "sweep",
    "work_dir",
    "project",
    "entity",
    "group",
    "tags",
    "notes",
    "file",
    "dir",
}
# AnyNode: a count or a word (train.batch_size: a number or auto)
WRONG_TYPE = {
    IntegerNode: ["abc", "1.5"],
    FloatNode: ["abc"],
    BooleanNode: ["maybe"],
    StringNode: ["[1,2]"],
    AnyNode: ["abc", "1.5", "[1,2]"],
}
OUT_OF_RANGE = {
    IntegerNode: ["-1", str(2**64)],
    FloatNode: ["-1.0", "nan", "inf"],
    BooleanNode: [],
    StringNode: ["no_such_value"],
    AnyNode: ["-1", "0"],
}


def leaves(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Node]]:
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from leaves(child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", child


def bad_values(key: str, node: Node) -> list[str]:
    free = key.rsplit(".", 1)[-1] in FREE_TEXT
    if isinstance(node, ListConfig):
        element = {int: IntegerNode, float: FloatNode, str: StringNode}[node._metadata.element_type]
        in_range = [] if free else [f"[{value}]" for value in OUT_OF_RANGE[element]]
        return ["abc", *in_range]
    kind = type(node)
    return WRONG_TYPE[kind] + ([] if free and kind is StringNode else OUT_OF_RANGE[kind])


def variants(script: str) -> list[list[str]]:
    """The overrides that compose each option of each component group once (the default options first)."""
    if script != "train":
        return [[]]
    groups = [*OPTION_GROUPS, "logger"]
    options = [(group, path.stem) for group in groups for path in sorted((CONF_DIR / group).glob("*.yaml"))]
    return [[], *([f"{group}={option}"] for group, option in options)]


PARSER = OverridesParser.create()


def refusal(validate: Callable[[DictConfig], Any], cfg: DictConfig, key: str, text: str) -> str | None:
    """The error line for `key=text` (as the scripts print it), or None when the value is accepted."""
    override = PARSER.parse_overrides([f"{key}={text}"])
    try:
        ConfigLoaderImpl._apply_overrides_to_config(override, cfg)  # what Hydra does with a command line
        validate(cfg)
    except (HydraException, OmegaConfBaseException) as ex:
        return f"error: {composition_error(ex)}"
    except UserError as ex:
        return f"error: {ex}"
    return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_knob_refuses_values_of_the_wrong_type_and_out_of_range(script: str) -> None:
    validate, required = SCRIPTS[script]
    failures, tried = [], set()
    for overrides in variants(script):
        composed = compose_config(script, [*required, *overrides])
        validate(composed.copy())  # the config as composed is valid
        for key, node in leaves(composed):
            for text in bad_values(key, node):
                if (key, text) in tried:
                    continue
                tried.add((key, text))
                line = refusal(validate, composed.copy(), key, text)
                knob = key.rsplit(".", 1)[-1]
                if line is None:
                    failures.append(f"{key}={text}: accepted")
                elif not re.fullmatch(r"error: [^\n]+ \([^\n]+\)", line) or knob not in line:
                    failures.append(f"{key}={text}: {line!r}")
    assert tried
    assert not failures, "\n".join(failures)
