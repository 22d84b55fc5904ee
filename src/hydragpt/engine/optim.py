"""Optimizers: each option of the `optim` group is a dataclass of its knobs with a `build`.

`build(model, device)` returns one or more optimizers over the model's parameters; every parameter group
records its `initial_lr`, of which the lr schedule is a multiplier. Adding an optimizer is one class here
(decorated with `@option`) and one YAML file under conf/optim/.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from hydragpt.config import require
from hydragpt.model import GPT
from hydragpt.registry import option

# Optional[...] rather than `X | None`: OmegaConf reads these annotations when the config is composed.
# ruff: noqa: UP045

log = logging.getLogger(__name__)


def _check(values: dict[str, float], examples: dict[str, str]) -> None:
    """Range checks by knob name: learning rates and eps > 0, betas and momentum in [0, 1), decay >= 0;
    the fix suggests `examples[key]` (a typical value of that knob for this optimizer)."""
    for key, value in values.items():
        if key.endswith(("lr", "eps")):
            require(value > 0, f"optim.{key} must be > 0, got {value}", f"e.g. optim.{key}={examples[key]}")
        elif key.endswith(("beta1", "beta2", "momentum")):
            require(0 <= value < 1, f"optim.{key} must be in [0, 1), got {value}", f"e.g. optim.{key}=0.95")
        else:
            require(value >= 0, f"optim.{key} must be >= 0, got {value}", f"e.g. optim.{key}=0 to disable")


def _groups(*groups: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter groups with their `initial_lr` (what the schedule multiplies), empty ones left out."""
    return [{**group, "initial_lr": group["lr"]} for group in groups if group["params"]]


def _describe(name: str, groups: list[dict[str, Any]]) -> None:
    for group in groups:
        params = group["params"]
        log.info(
            "optimizer %s: %s parameters in %d tensors, lr %g, weight decay %g",
            name,
            f"{sum(p.numel() for p in params):,}",
            len(params),
            group["lr"],
            group.get("weight_decay", 0.0),
        )


def fused_default(device: torch.device) -> bool:
    """AdamW's fused kernel where torch has one: CUDA, and CPUs (a few percent faster per step there,
    measured with scripts/bench_train.py; docs/training.md)."""
    return device.type in ("cuda", "cpu")


@option("optim", "adamw")
class AdamW:
    """AdamW on every parameter; weight decay on matrices and embeddings, never on gains and biases."""

    lr: float = 6e-4  # peak learning rate (after warmup)
    weight_decay: float = 0.1  # decoupled weight decay
    beta1: float = 0.9  # first-moment decay
    beta2: float = 0.95  # second-moment decay: 0.95 for large batches, 0.99 for small models and batches
    eps: float = 1e-8  # denominator epsilon
    fused: Optional[bool] = None  # one kernel for the whole step: null picks it on CUDA and CPUs; true/false

    def __post_init__(self) -> None:
        _check(
            {key: getattr(self, key) for key in ("lr", "weight_decay", "beta1", "beta2", "eps")},
            examples={"lr": "6e-4", "eps": "1e-8"},
        )

    def build(self, model: GPT, device: torch.device) -> list[torch.optim.Optimizer]:
        kinds = model.parameter_groups()
        groups = _groups(
            {
                "params": kinds["matrices"] + kinds["embeddings"] + kinds["head"],
                "lr": self.lr,
                "weight_decay": self.weight_decay,
            },
            {"params": kinds["vectors"], "lr": self.lr, "weight_decay": 0.0},
        )
        _describe("AdamW", groups)
        fused = fused_default(device) if self.fused is None else self.fused
        return [torch.optim.AdamW(groups, betas=(self.beta1, self.beta2), eps=self.eps, fused=fused)]


MUON_LR_ADJUSTMENTS = ("original", "match_rms_adamw")


@option("optim", "muon")
class Muon:
    """torch.optim.Muon (momentum, then Newton-Schulz orthogonalisation) for the blocks' 2-D matrices;
    AdamW for the embeddings, the output head, gains and biases, each with its own lr."""

    lr: float = 0.02  # Muon's peak learning rate, for the blocks' matrices
    momentum: float = 0.95  # Muon's momentum
    nesterov: bool = True  # Nesterov momentum
    ns_steps: int = 5  # Newton-Schulz iterations per update
    weight_decay: float = 0.0  # Muon's decoupled weight decay
    adjust_lr_fn: str = "original"  # per-shape lr scaling: original (sqrt(max(1, rows/cols))) or match_rms_adamw
    embedding_lr: float = 0.006  # AdamW's peak lr for the token and position embeddings (and the tied head)
    head_lr: Optional[float] = None  # AdamW's peak lr for an untied output head (null: embedding_lr)
    vector_lr: float = 0.006  # AdamW's peak lr for gains and biases
    adamw_weight_decay: float = 0.0  # AdamW's weight decay (embeddings and head; never gains and biases)
    adamw_beta1: float = 0.8  # AdamW's first-moment decay
    adamw_beta2: float = 0.95  # AdamW's second-moment decay
    adamw_eps: float = 1e-10  # AdamW's denominator epsilon
    fused: Optional[bool] = None  # AdamW's fused kernel: null picks it on CUDA and CPUs

    def __post_init__(self) -> None:
        numbers = ("lr", "momentum", "weight_decay", "embedding_lr", "vector_lr", "adamw_weight_decay")
        numbers += ("adamw_beta1", "adamw_beta2", "adamw_eps") + (("head_lr",) if self.head_lr is not None else ())
        _check(
            {key: getattr(self, key) for key in numbers},
            examples={
                "lr": "0.02",
                "embedding_lr": "0.006",
                "head_lr": "0.002",
                "vector_lr": "0.006",
                "adamw_eps": "1e-10",
            },
        )
        require(
            hasattr(torch.optim, "Muon"),
            f"optim=muon needs torch.optim.Muon, which torch {torch.__version__} lacks",
            'install torch 2.9 or later (.venv/bin/pip install "torch>=2.9"), or use optim=adamw',
        )
        require(1 <= self.ns_steps < 100, f"optim.ns_steps must be in [1, 100), got {self.ns_steps}", "e.g. 5")
        require(
            self.adjust_lr_fn in MUON_LR_ADJUSTMENTS,
            f"unknown optim.adjust_lr_fn '{self.adjust_lr_fn}'",
            f"use one of: {', '.join(MUON_LR_ADJUSTMENTS)}",
        )

    def build(self, model: GPT, device: torch.device) -> list[torch.optim.Optimizer]:
        kinds = model.parameter_groups()
        muon_groups = _groups({"params": kinds["matrices"], "lr": self.lr, "weight_decay": self.weight_decay})
        adam_groups = _groups(
            {"params": kinds["embeddings"], "lr": self.embedding_lr, "weight_decay": self.adamw_weight_decay},
            {
                "params": kinds["head"],
                "lr": self.embedding_lr if self.head_lr is None else self.head_lr,
                "weight_decay": self.adamw_weight_decay,
            },
            {"params": kinds["vectors"], "lr": self.vector_lr, "weight_decay": 0.0},
        )
        _describe("Muon", muon_groups)
        _describe("AdamW", adam_groups)
        fused = fused_default(device) if self.fused is None else self.fused
        betas = (self.adamw_beta1, self.adamw_beta2)
        return [
            torch.optim.Muon(
                muon_groups,
                momentum=self.momentum,
                nesterov=self.nesterov,
                ns_steps=self.ns_steps,
                adjust_lr_fn=self.adjust_lr_fn,
            ),
            torch.optim.AdamW(adam_groups, betas=betas, eps=self.adamw_eps, fused=fused),
        ]


def step_if_finite(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """Step unless `nonfinite` (a 0/1 float on the device) is set, without the host waiting for the device:
    fused optimizers skip the update in their kernels; the others step and then put back what the step
    changed (`undo_step_if`). On the CPU the host is the device, so reading the flag waits for nothing."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = nonfinite  # type: ignore[attr-defined]  # read by the fused kernels
        optimizer.step()
    elif nonfinite.device.type == "cpu":
        if not nonfinite.item():
            optimizer.step()
    else:
        undo_step_if(optimizer, nonfinite)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter (a DTensor), or the tensor itself: the storage updated in place."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


@torch.no_grad()
def undo_step_if(optimizer: torch.optim.Optimizer, nonfinite: torch.Tensor) -> None:
    """Step, then where `nonfinite` is set restore the parameters and state from before it; state the step
    created (a first step's momentum) goes back to zeros, as optimizers create it. Costs a copy of the
    parameters and state on the device instead of a wait for it (state kept on the host, as a non-fused
    AdamW's step counts, still waits)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    existing = [v for p in params for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    before = [(_local(t), _local(t).clone()) for t in (*params, *existing)]
    optimizer.step()
    kept = {id(t) for t in existing}
    created = [v for p in params for v in optimizer.state[p].values() if torch.is_tensor(v) and id(v) not in kept]
    before += [(_local(t), torch.zeros_like(_local(t))) for t in created]
    skip = {nonfinite.device: nonfinite.bool()}
    for tensor, old in before:
        if tensor.device not in skip:
            skip[tensor.device] = skip[nonfinite.device].to(tensor.device)
        tensor.copy_(torch.where(skip[tensor.device], old, tensor))


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings, without its parameters."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
