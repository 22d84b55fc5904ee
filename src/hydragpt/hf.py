"""GPT-2 in Hugging Face's format: OpenAI's pretrained weights in, our checkpoints out.

The two models are the same network under the same parameter names, except that Hugging Face's GPT-2
keeps its four projection matrices as `Conv1D` weights, (in, out) where `nn.Linear` has (out, in), and
that OpenAI's GPT-2 uses the tanh approximation of GELU (`model.activation=gelu_tanh` here). Both
directions go through `transformers` (the `hf` extra); a local directory (`hf:<dir>`) needs no network.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydragpt.errors import UserError
from hydragpt.model import GPTConfig

log = logging.getLogger(__name__)

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_PREFIX = "hf:"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_TOKENIZER = {"kind": "tiktoken", "name": "gpt2"}  # what every imported model is taken to use
GPT2_VOCAB = 50257
# Hugging Face's names for our activations, and the ones it may use for ours.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# Model knobs whose non-default values GPT-2 has no equivalent for (export refuses them).
GPT2_ONLY = ("positions", "norm", "norm_weight", "qk_norm", "tie_embeddings", "logit_softcap")
FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def is_pretrained(name: str) -> bool:
    """`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (from the Hub) or `hf:<local directory>`."""
    return name in PRETRAINED or name.startswith(HF_PREFIX)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as ex:
        raise UserError("GPT-2 import and export need the transformers package", "pip install 'hydragpt[hf]'") from ex
    return transformers


def quiet_hub_retries() -> None:
    """huggingface_hub logs every retry of an unreachable Hub as a warning (a dozen lines offline); the
    final failure is what the user needs, and it becomes one `error:` line."""
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def load_pretrained(name: str) -> dict[str, Any]:
    """A pretrained GPT-2 as the parts of a checkpoint a new run starts from (weights, shape, tokenizer)."""
    transformers = _transformers()
    source = name.removeprefix(HF_PREFIX)
    if name.startswith(HF_PREFIX) and not (Path(source) / "config.json").is_file():
        raise UserError(
            f"{source} is not a Hugging Face model directory (no config.json)",
            "give hf:<a directory with config.json and weights, as save_pretrained or scripts/export.py write>",
        )
    quiet_hub_retries()
    try:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(source)
    except (OSError, ValueError) as ex:
        reason = next(iter(str(ex).strip().splitlines()), type(ex).__name__)
        raise UserError(
            f"cannot load GPT-2 '{source}': {reason}",
            "check the name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), the network, or use hf:<local directory>",
        ) from ex
    c = hf_model.config
    unsupported = {
        "activation_function": c.activation_function not in FROM_HF_ACTIVATION,
        "n_inner": c.n_inner not in (None, 4 * c.n_embd),
        "scale_attn_by_inverse_layer_idx": c.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": c.reorder_and_upcast_attn,
        "layer_norm_epsilon": c.layer_norm_epsilon != 1e-5,
        "tie_word_embeddings=false": not c.tie_word_embeddings,
        "scale_attn_weights=false": not c.scale_attn_weights,
        f"vocab_size={c.vocab_size} (GPT-2's tokenizer has 50257)": c.vocab_size < GPT2_VOCAB,
    }
    if any(unsupported.values()):
        options = ", ".join(k for k, bad in unsupported.items() if bad)
        raise UserError(f"'{source}' uses GPT-2 options this model does not have: {options}", "use a plain GPT-2")
    config = GPTConfig(
        name=Path(source).name,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.n_positions,
        vocab_size=c.vocab_size,
        dropout=0.0,
        bias=True,
        activation=FROM_HF_ACTIVATION[c.activation_function],
    )
    state = {
        key: value.t().contiguous() if key.endswith(CONV1D) else value
        for key, value in hf_model.state_dict().items()
        if not key.endswith((".attn.bias", ".attn.masked_bias"))  # causal-mask buffers of older versions
    }
    log.info("loaded GPT-2 '%s': %d layers, %d heads, %d wide", source, c.n_layer, c.n_head, c.n_embd)
    return {"model": state, "model_config": asdict(config), "tokenizer": GPT2_TOKENIZER}


def export(ckpt: dict[str, Any], out_dir: Path) -> None:
    """Write `ckpt`'s model as a Hugging Face GPT-2 directory (config.json, model.safetensors, and the
    tokenizer files when the tokenizer is GPT-2's)."""
    transformers = _transformers()
    config = GPTConfig(**ckpt["model_config"])
    if not config.bias:
        raise UserError(
            "GPT-2 has biases in every linear and layer-norm layer, and this model was trained with model.bias=false",
            "export a model trained with model.bias=true",
        )
    gpt2 = GPTConfig(vocab_size=config.vocab_size)  # GPT-2's architecture: every option at its default
    differs = [knob for knob in GPT2_ONLY if getattr(config, knob) != getattr(gpt2, knob)]
    differs += ["n_kv_head"] if config.kv_heads != config.n_head else []
    differs += ["activation"] if config.activation not in HF_ACTIVATIONS else []
    if differs:
        knob = differs[0]
        raise UserError(
            f"this model has model.{knob}={getattr(config, knob)}, which GPT-2 has no equivalent for",
            f"export a model trained with GPT-2's model.{knob}={getattr(gpt2, knob)}",
        )
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function=HF_ACTIVATIONS[config.activation],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
        bos_token_id=50256 if ckpt["tokenizer"] == GPT2_TOKENIZER else None,
        eos_token_id=50256 if ckpt["tokenizer"] == GPT2_TOKENIZER else None,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config)
    state = {k: v.t().contiguous() if k.endswith(CONV1D) else v for k, v in ckpt["model"].items()}
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise UserError(
            f"the checkpoint's weights do not fit GPT-2 (missing {missing}, unexpected {unexpected})",
            "export a hydragpt GPT checkpoint",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    if ckpt["tokenizer"] == GPT2_TOKENIZER:
        import tiktoken
        from transformers.integrations.tiktoken import convert_tiktoken_to_fast

        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as ex:  # its BPE files are downloaded once, then cached
            raise UserError(
                f"cannot load GPT-2's tokenizer: {ex}", "connect once, or set TIKTOKEN_CACHE_DIR to a seeded cache"
            ) from ex
        convert_tiktoken_to_fast(encoding, out_dir)
    else:
        log.info("tokenizer %s has no Hugging Face equivalent: no tokenizer files written", ckpt["tokenizer"]["kind"])
