"""Our models in EleutherAI's lm-evaluation-harness: `HarnessModel`, registered with lm-eval as "hydragpt".

lm-eval turns each task into requests of three kinds and scores the answers itself:
- `loglikelihood`: the log-probability of a continuation after a context, and whether greedy decoding
  would have produced it (multiple choice: one request per choice);
- `loglikelihood_rolling`: the log-probability of a whole document, in windows of the model's block
  that each predict new tokens with as much context as fits (perplexity, bits per byte);
- `generate_until`: greedy (or sampled) text until a stop string, through the KV cache.

Log-likelihoods run in batches of windows sorted by length, padded on the right (a causal model never
sees the padding). Generation batches the requests whose contexts are equally long. Under torchrun lm-eval
gives each rank every world_size-th request and gathers the answers through the collectives below.

lm-eval is an optional dependency (`pip install 'hydragpt[eval]'`): `import lm_eval` happens only here.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from hydragpt.config import SuiteConfig
from hydragpt.data.tokenizer import Tokenizer
from hydragpt.engine.distributed import broadcast_object
from hydragpt.engine.system import autocast, resolve_device, resolve_dtype
from hydragpt.errors import UserError
from hydragpt.model import GPT
from hydragpt.sampling import Settings, complete, load_model, load_source

try:
    from lm_eval import simple_evaluate
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
except ImportError as ex:
    raise UserError(
        "task=lm_eval needs EleutherAI's lm-evaluation-harness, which is not installed",
        "pip install 'hydragpt[eval]' (or pip install lm-eval)",
    ) from ex

# What generate_until takes from a task's generation_kwargs; anything else is refused, not ignored.
GENERATION_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p"}
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default
GENERATION_SEED = 1234  # the generator of tasks that sample (do_sample): the same answers every run


@register_model("hydragpt")
class HarnessModel(TemplateLM):
    """A loaded GPT and its tokenizer as an lm-eval model.

    scripts/eval.py task=lm_eval builds it from a loaded model; from Python, after `import hydragpt.harness`,
    `lm_eval.simple_evaluate(model="hydragpt", model_args="ckpt=<run dir or .pt>", ...)` (or `init_from=gpt2`,
    `init_from=hf:<dir>`) builds it from its arguments.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.model, self._tokenizer = model, tokenizer
        self.batch_size = batch_size
        self.dtype = dtype
        self._device = next(model.parameters()).device
        self.vocab_size = tokenizer.vocab_size
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        # A special end-of-text token stands for no text (GPT-2's <|endoftext|>); the char tokenizer's
        # separator is a newline, which is text, so generation does not stop at it.
        separator = tokenizer.separator
        self._end_token = separator if separator is not None and tokenizer.token_bytes()[separator] == 0 else None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> HarnessModel:
        """`ckpt=...`, `init_from=...`, `batch_size=...`, `device=...`, `dtype=...` from lm-eval's CLI."""
        args = lm_eval_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        unknown = set(args) - {"ckpt", "init_from", "batch_size", "device", "dtype", "output_dir"}
        if unknown:
            raise UserError(
                f"unknown hydragpt model_args: {', '.join(sorted(unknown))}",
                "give ckpt=<run dir or .pt> or init_from=<gpt2|hf:dir>, and optionally batch_size, device, dtype",
            )
        ckpt, _ = load_source(
            str(args.get("ckpt", "latest")), args.get("init_from"), Path(args.get("output_dir", "outputs"))
        )
        device = resolve_device(str(args.get("device", extra.get("device", "auto"))), key="device")
        model, tokenizer = load_model(ckpt, device)
        batch_size = str(args.get("batch_size", extra.get("batch_size") or 8))
        if not batch_size.isdigit() or int(batch_size) < 1:
            raise UserError(f"hydragpt model_args: batch_size={batch_size}", "give a number of sequences, e.g. 16")
        return cls(model, tokenizer, int(batch_size), resolve_dtype(str(args.get("dtype", "auto")), device))

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.separator if self._tokenizer.separator is not None else 0

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return str(self._tokenizer.describe().get("name", "char"))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        try:
            return self._tokenizer.encode(string)
        except UserError as ex:  # a char vocabulary meeting a task's text
            raise UserError(
                f"the model's tokenizer cannot encode a task's text: {ex.what}",
                "evaluate a model whose tokenizer encodes any text (GPT-2's BPE), or tasks written in its characters",
            ) from None

    def tok_decode(self, tokens: list[int]) -> str:
        return self._tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """For each (key, context tokens, continuation tokens): the continuation's summed log-probability
        and whether each of its tokens is the argmax. A context too long for the block keeps its end (a
        continuation longer than the block: its last block_size tokens are scored)."""
        windows = []
        for key, context, continuation in requests:
            window = ((context or [self.prefix_token_id]) + continuation)[-(self.max_length + 1) :]
            scored = continuation[-(len(window) - 1) :]
            windows.append((key, window[:-1], len(scored), scored))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))  # similar lengths batch together
        answers: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="log-likelihoods", disable=disable_tqdm or self.rank != 0):
            inputs = [windows[i][1] for i in batch]
            idx = torch.zeros(len(batch), max(len(x) for x in inputs), dtype=torch.long)
            for row, x in enumerate(inputs):
                idx[row, : len(x)] = torch.tensor(x)
            with autocast(self._device, self.dtype):
                logits, _ = self.model(idx.to(self._device))
            for row, i in enumerate(batch):
                key, x, n, continuation = windows[i]
                # the positions that predict the continuation, over the tokenizer's ids (not padded rows)
                scored = F.log_softmax(logits[row, len(x) - n : len(x), : self.vocab_size].float(), dim=-1)
                target = torch.tensor(continuation, device=self._device)
                answer = (
                    scored.gather(-1, target[:, None]).sum().item(),
                    bool((scored.argmax(dim=-1) == target).all()),
                )
                answers[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document's log-probability: windows of the block, each predicting the tokens after the
        previous one's, the first conditioned on the end-of-text token (lm-eval's rolling windows)."""
        windows, owners = [], []
        for n, (text,) in enumerate(request.args for request in requests):
            for context, predicted in map(
                lm_eval_utils.make_disjoint_window,
                lm_eval_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, predicted))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (log_prob, _) in zip(owners, scores, strict=True):
            totals[n] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Text after each context until one of its stop strings (left out) or the end-of-text token, at
        most max_gen_toks tokens; greedy unless the task asks to sample."""
        texts: list[str] = [""] * len(requests)
        settings = [_generation_settings(request.args[1]) for request in requests]
        prompts = [self._prompt(r.args[0], s.max_new_tokens) for r, s in zip(requests, settings, strict=True)]
        # requests generate together when their settings and their context lengths are the same
        keys = [(repr(sorted(r.args[1].items())), len(p)) for r, p in zip(requests, prompts, strict=True)]
        groups = itertools.groupby(sorted(range(len(requests)), key=keys.__getitem__), key=keys.__getitem__)
        progress = tqdm(total=len(requests), desc="generating", disable=disable_tqdm or self.rank != 0)
        for _, members in groups:
            members = list(members)
            for batch in (members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)):
                generator = torch.Generator(self._device).manual_seed(GENERATION_SEED)
                generated = complete(
                    self.model,
                    self._tokenizer,
                    [prompts[i] for i in batch],
                    settings[batch[0]],
                    generator,
                    self.dtype,
                    end_token=self._end_token,
                )
                for i, text in zip(batch, generated, strict=True):
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return texts

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's last tokens, leaving room in the block for `max_new` new ones (at least one token)."""
        tokens = self.tok_encode(context) or [self.prefix_token_id]
        return tokens[-max(1, self.max_length - max_new) :]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _generation_settings(kwargs: dict[str, Any]) -> Settings:
    """A task's generation_kwargs as our generation settings: stop strings, a token budget, and greedy
    decoding unless the task asks to sample."""
    unknown = set(kwargs) - GENERATION_KWARGS
    if unknown:
        raise UserError(
            f"the task's generation_kwargs has {', '.join(sorted(unknown))}, which hydragpt cannot honour",
            f"use only {', '.join(sorted(GENERATION_KWARGS))}",
        )
    until = kwargs.get("until") or []
    sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
    return Settings(
        max_new_tokens=int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", DEFAULT_MAX_GEN_TOKS))),
        temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
        top_k=kwargs.get("top_k") if sample else None,
        top_p=kwargs.get("top_p") if sample else None,
        stop=[until] if isinstance(until, str) else list(until),
        use_cache=True,
    )


def evaluate_tasks(
    lm: HarnessModel,
    tasks: list[str],
    num_fewshot: int | None,
    limit: int | None,
    include_path: str | None,
    bootstrap_iters: int,
) -> dict[str, Any] | None:
    """lm-eval's own evaluation of `lm` on `tasks` (names of its tasks or groups, or of YAML task files'
    tasks under `include_path`): its results dict with every sample on rank 0, None on the others."""
    manager = _task_manager(tuple(tasks), include_path)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        where = f" (nor under include_path={include_path})" if include_path else ""
        raise UserError(
            f"lm-eval has no task {', '.join(unknown)}{where}",
            "check the names (lm_eval --tasks list shows them), or give lm_eval.include_path=<dir of task YAMLs>",
        )
    try:
        return simple_evaluate(
            model=lm,
            tasks=manager.match_tasks(tasks),  # `arc_*` and the like, expanded
            # the global RNGs stay as they are (lm-eval reseeds them by default): training's dropout on
            # each rank goes on after a suite's evaluation as before it
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=bootstrap_iters,
        )
    except Exception as ex:
        if not _is_download_error(ex):
            raise
        raise UserError(
            f"cannot load the data of lm-eval task(s) {', '.join(tasks)}: {str(ex).splitlines()[0]}",
            "connect to the Hugging Face Hub once (datasets caches what it downloads), or define the task over"
            " local files (dataset_path: json, dataset_kwargs.data_files) under lm_eval.include_path",
        ) from ex


def _is_download_error(ex: Exception) -> bool:
    """A task's dataset that the Hub could not give: the network, a wrong name, offline mode."""
    from datasets.exceptions import DatasetNotFoundError

    hub = type(ex).__module__.split(".")[0] == "huggingface_hub"
    return isinstance(ex, (ConnectionError, DatasetNotFoundError)) or hub


@functools.cache
def _task_manager(tasks: tuple[str, ...], include_path: str | None) -> TaskManager:
    """The tasks under `include_path` alone when they are all that is asked for: indexing lm-eval's own
    thousands of task files takes about 10 s (once per process: training's evaluations reuse it)."""
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(local.match_tasks([task]) for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def score_suite(lm: HarnessModel, suite: SuiteConfig, bootstrap_iters: int) -> tuple[dict[str, Any], list[dict]]:
    """The suite's score on rank 0 ({} on the others): each task's metric, the same centred on its random
    baseline, and their mean; with lm-eval's results, one per few-shot count the suite uses."""
    values: dict[str, float] = {}
    runs = []
    problem: UserError | None = None  # found on rank 0, raised on every rank (the others would wait for it)
    for shots in sorted({t.num_fewshot for t in suite.tasks}):
        tasks = [t for t in suite.tasks if t.num_fewshot == shots]
        results = evaluate_tasks(lm, [t.task for t in tasks], shots, suite.limit, suite.include_path, bootstrap_iters)
        if results is None:  # ranks other than 0
            continue
        runs.append(results)
        for t in tasks:
            metrics = results["results"][t.task]
            if f"{t.metric},none" not in metrics:
                named = sorted({k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k})
                problem = problem or UserError(
                    f"suite {suite.name}: task {t.task} has no metric {t.metric}", f"use one of: {', '.join(named)}"
                )
            else:
                values[t.task] = float(metrics[f"{t.metric},none"])
    if problem := broadcast_object(problem):
        raise problem
    if not runs:
        return {}, []
    centred = {t.task: (values[t.task] - t.random_baseline) / (1 - t.random_baseline) for t in suite.tasks}
    score = {"name": suite.name, "score": sum(centred.values()) / len(centred), "centred": centred, "metrics": values}
    return score, runs


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each task's (and group's) metrics as plain names: `acc` for lm-eval's "acc,none" (the unfiltered
    value); a filtered one keeps its filter, `exact_match,strict-match`."""
    table = {**results.get("results", {}), **results.get("groups", {})}
    return {
        task: {
            key.removesuffix(",none"): value
            for key, value in metrics.items()
            if "," in key and "_stderr," not in key and isinstance(value, (int, float))  # "metric,filter" keys
        }
        for task, metrics in table.items()
    }


def table(results: dict[str, Any]) -> str:
    """lm-eval's own tables: every task, then every group."""
    text = lm_eval_utils.make_table(results)
    if results.get("groups"):
        text += "\n" + lm_eval_utils.make_table(results, "groups")
    return text
