"""GPT-2 and Llama in Hugging Face's format: pretrained weights in, our checkpoints out.

GPT-2: the two models are the same network under the same parameter names, except that Hugging Face's
GPT-2 keeps its four projection matrices as `Conv1D` weights, (in, out) where `nn.Linear` has (out, in),
and that OpenAI's GPT-2 uses the tanh approximation of GELU (`model.activation=gelu_tanh` here).
Llama: a model with rotary positions, RMSNorm with gains, a SwiGLU MLP and no biases (grouped-query
attention and an untied head allowed) is Llama's network; our fused query/key/value and gate/up matrices
are split into Llama's. Both directions go through `transformers` (the `hf` extra); a local directory
(`hf:<dir>`) needs no network.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hydragpt.data.tokenizer import CHAT_TOKENS, TiktokenTokenizer, with_chat_tokens
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
# What a rotary model needs to be Llama's network (knob: value), and the epsilon of our RMSNorm (float32's).
LLAMA_NEEDS = {"norm": "rmsnorm", "norm_weight": True, "activation": "swiglu", "bias": False, "qk_norm": False}
RMS_EPS = torch.finfo(torch.float32).eps


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
    """A pretrained GPT-2, or a local Llama directory, as the parts of a checkpoint a new run starts from
    (weights, shape, tokenizer)."""
    transformers = _transformers()
    source = name.removeprefix(HF_PREFIX)
    if name.startswith(HF_PREFIX) and not (Path(source) / "config.json").is_file():
        raise UserError(
            f"{source} is not a Hugging Face model directory (no config.json)",
            "give hf:<a directory with config.json and weights, as save_pretrained or scripts/export.py write>",
        )
    if (
        name.startswith(HF_PREFIX)
        and json.loads((Path(source) / "config.json").read_text()).get("model_type") == "llama"
    ):
        return _load_llama(transformers, source)
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
    _refuse(unsupported, f"'{source}' uses GPT-2 options this model does not have", "use a plain GPT-2")
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


def _refuse(unsupported: dict[str, bool], what: str, fix: str) -> None:
    """One error naming every option (key) that is set (value true) and that our model cannot take."""
    if any(unsupported.values()):
        raise UserError(f"{what}: {', '.join(k for k, bad in unsupported.items() if bad)}", fix)


def _load_llama(transformers: Any, source: str) -> dict[str, Any]:
    """A local Llama directory (one `export` wrote, or any of the same architecture) as checkpoint parts."""
    try:
        hf_model = transformers.LlamaForCausalLM.from_pretrained(source)
    except (OSError, ValueError) as ex:
        raise UserError(f"cannot load Llama '{source}': {str(ex).strip()[:200]}", "check the directory") from ex
    c = hf_model.config
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    config = GPTConfig(
        name=Path(source).name,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_embd=c.hidden_size,
        block_size=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        dropout=0.0,
        bias=False,
        activation="swiglu",
        positions="rope",
        rope_base=rope["rope_theta"],
        norm="rmsnorm",
        n_kv_head=c.num_key_value_heads,
        tie_embeddings=c.tie_word_embeddings,
    )
    unsupported = {
        f"hidden_act={c.hidden_act}": c.hidden_act != "silu",
        "attention_bias or mlp_bias": c.attention_bias or c.mlp_bias,
        f"rope_type={rope.get('rope_type')}": rope.get("rope_type", "default") != "default",
        f"rms_norm_eps={c.rms_norm_eps} (ours: {RMS_EPS:.3g})": c.rms_norm_eps != RMS_EPS,
        f"intermediate_size={c.intermediate_size}": c.intermediate_size != config.mlp_hidden,
        f"head_dim={getattr(c, 'head_dim', None)}": getattr(c, "head_dim", None)
        not in (None, c.hidden_size // c.num_attention_heads),
        f"vocab_size={c.vocab_size} (GPT-2's tokenizer has 50257)": c.vocab_size < GPT2_VOCAB,
    }
    _refuse(unsupported, f"'{source}' uses Llama options this model does not have", "use one export wrote")
    sd, state = hf_model.state_dict(), {}
    state["transformer.wte.weight"] = sd["model.embed_tokens.weight"]
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        attn, mlp = theirs + "self_attn.", theirs + "mlp."
        state[ours + "attn.c_attn.weight"] = torch.cat([sd[attn + f"{x}_proj.weight"] for x in "qkv"])
        state[ours + "attn.c_proj.weight"] = sd[attn + "o_proj.weight"]
        state[ours + "mlp.c_fc.weight"] = torch.cat([sd[mlp + "gate_proj.weight"], sd[mlp + "up_proj.weight"]])
        state[ours + "mlp.c_proj.weight"] = sd[mlp + "down_proj.weight"]
        state[ours + "ln_1.weight"] = sd[theirs + "input_layernorm.weight"]
        state[ours + "ln_2.weight"] = sd[theirs + "post_attention_layernorm.weight"]
    state["transformer.ln_f.weight"] = sd["model.norm.weight"]
    state["lm_head.weight"] = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    log.info(
        "loaded Llama '%s': %d layers, %d heads, %d wide", source, c.num_hidden_layers, config.n_head, c.hidden_size
    )
    return {"model": state, "model_config": asdict(config), "tokenizer": GPT2_TOKENIZER}


def _typed(value: Any) -> str:
    """A knob's value as one types it: false, null, rmsnorm."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _export_llama(transformers: Any, config: GPTConfig, ckpt: dict[str, Any], out_dir: Path) -> None:
    """Write a rotary model as a Hugging Face Llama directory; refuse a knob Llama has no equivalent for."""
    for knob, value in {**LLAMA_NEEDS, "logit_softcap": None}.items():
        if getattr(config, knob) != value:
            raise UserError(
                f"this model has model.{knob}={_typed(getattr(config, knob))}, which Llama has no equivalent for",
                f"export a model trained with model.{knob}={_typed(value)} (Llama's)",
            )
    sd, head_size, kv = ckpt["model"], config.n_embd // config.n_head, config.kv_heads
    hidden = sd["transformer.h.0.mlp.c_proj.weight"].shape[1]
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=kv,
        head_dim=head_size,
        max_position_embeddings=config.block_size,
        rms_norm_eps=RMS_EPS,
        rope_theta=config.rope_base,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    state = {
        "model.embed_tokens.weight": sd["transformer.wte.weight"],
        "model.norm.weight": sd["transformer.ln_f.weight"],
    }
    for i in range(config.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        q, k, v = sd[ours + "attn.c_attn.weight"].split([config.n_embd, kv * head_size, kv * head_size])
        gate, up = sd[ours + "mlp.c_fc.weight"].chunk(2)
        state |= {
            theirs + "self_attn.q_proj.weight": q,
            theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": sd[ours + "attn.c_proj.weight"],
            theirs + "mlp.gate_proj.weight": gate,
            theirs + "mlp.up_proj.weight": up,
            theirs + "mlp.down_proj.weight": sd[ours + "mlp.c_proj.weight"],
            theirs + "input_layernorm.weight": sd[ours + "ln_1.weight"],
            theirs + "post_attention_layernorm.weight": sd[ours + "ln_2.weight"],
        }
    if not config.tie_embeddings:
        state["lm_head.weight"] = sd["lm_head.weight"]
    hf_model = transformers.LlamaForCausalLM(hf_config)
    missing, unexpected = hf_model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise UserError(
            f"the weights do not fit Llama (missing {missing}, unexpected {unexpected})", "export a hydragpt checkpoint"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)


def export(ckpt: dict[str, Any], out_dir: Path) -> None:
    """Write `ckpt`'s model as a Hugging Face directory: Llama for a rotary model, else GPT-2 (config.json,
    model.safetensors, and the tokenizer files when the tokenizer is GPT-2's)."""
    transformers = _transformers()
    config = GPTConfig(**ckpt["model_config"])
    if config.positions == "rope":
        _export_llama(transformers, config, ckpt, out_dir)
        _write_tokenizer(ckpt, out_dir)
        return
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
    ends = _gpt2_ends(ckpt)
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
        bos_token_id=ends[0],
        eos_token_id=ends[1],
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
    _write_tokenizer(ckpt, out_dir)


def _gpt2_ends(ckpt: dict[str, Any]) -> tuple[int | None, int | None]:
    """The ids that begin and end a text for a model on GPT-2's encoding: <|endoftext|> both, or for a chat
    model <|assistant_end|> ends (a reply); none for another tokenizer."""
    if ckpt["tokenizer"] == GPT2_TOKENIZER:
        return GPT2_VOCAB - 1, GPT2_VOCAB - 1
    if with_chat_tokens(ckpt["tokenizer"], GPT2_TOKENIZER):  # the role tokens follow GPT-2's vocabulary
        return GPT2_VOCAB - 1, GPT2_VOCAB + CHAT_TOKENS.index("<|assistant_end|>") - 1
    return None, None


# Hugging Face's apply_chat_template for the chat template of data/chat.py (a system message joins the first
# user message; the reply's opening token follows every user message, so it is the generation prompt too).
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}{%- set ns = namespace(system='') -%}{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\n\n' -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{{- '<|user_start|>' + ns.system + m['content'] + '<|user_end|><|assistant_start|>' -}}"
    "{%- set ns.system = '' -%}{%- elif m['role'] == 'assistant' -%}{{- m['content'] + '<|assistant_end|>' -}}"
    "{%- endif -%}{%- endfor -%}"
)


def _write_tokenizer(ckpt: dict[str, Any], out_dir: Path) -> None:
    """GPT-2's tokenizer files beside the model, when the model uses it (a char vocabulary has none); a chat
    model's have the chat tokens, <|assistant_end|> as the end token and the chat template."""
    bos, eos = _gpt2_ends(ckpt)
    if bos is not None and eos is not None:
        from transformers.integrations.tiktoken import convert_tiktoken_to_fast

        tokenizer = TiktokenTokenizer("gpt2", chat=ckpt["tokenizer"].get("chat", False))
        convert_tiktoken_to_fast(tokenizer._enc, out_dir)
        # as the Hub's gpt2: <|endoftext|> begins, ends and pads, so generate() and lm-eval stop at it (a
        # chat model's replies end at <|assistant_end|>)
        names = {i: name for name, i in tokenizer._enc._special_tokens.items()}
        fast = _transformers().PreTrainedTokenizerFast(
            tokenizer_file=str(out_dir / "tokenizer.json"),
            bos_token=names[bos],
            eos_token=names[eos],
            unk_token=names[bos],
        )
        if tokenizer.chat:
            fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(out_dir)
    else:
        log.info("tokenizer %s has no Hugging Face equivalent: no tokenizer files written", ckpt["tokenizer"]["kind"])
