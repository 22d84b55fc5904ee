"""The GPT language model, written to be read top to bottom (imports only torch).

By default GPT-2's architecture: learned position embeddings, pre-LayerNorm blocks, GELU MLP, weight tying
between the token embedding and the output head, and causal self-attention through
`scaled_dot_product_attention` (flash attention where the device has it), equivalent to nanoGPT's model,
so GPT-2 weights load into it unchanged. Each of today's recipes' changes is one knob of GPTConfig:
rotary positions, RMSNorm (with or without a gain), QK-norm, ReLU² or SwiGLU MLPs, grouped-query
attention, an untied head, logit soft-capping and zero-initialised output projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Optional[...] rather than `X | None`: OmegaConf reads these annotations when the config is composed.
# ruff: noqa: UP045

ACTIVATIONS = ("gelu", "gelu_tanh", "relu2", "swiglu")
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class GPTConfig:
    """The model's shape; conf/model/*.yaml are flavours of it. Defaults are GPT-2 small's."""

    name: str = "custom"  # flavour name, recorded in checkpoints and logs
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block (n_embd must divide by it)
    n_embd: int = 768  # residual stream width
    block_size: int = 1024  # context length in tokens (learned positions: sampling sees at most this many)
    vocab_size: Optional[int] = None  # null: the dataset tokenizer's size; a larger value pads the output layer
    dropout: float = 0.0  # dropout probability: 0 for pretraining, ~0.2 for small data such as Shakespeare
    bias: bool = True  # biases in Linear and LayerNorm layers (GPT-2 has them; without is a bit faster)
    activation: str = "gelu"  # MLP: gelu (exact, nanoGPT), gelu_tanh (OpenAI's GPT-2), relu2, swiglu (gated)
    positions: str = "learned"  # learned: a table of block_size positions (GPT-2); rope: rotary, none learned
    rope_base: float = 10000.0  # rope: the base of the rotation frequencies
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm
    norm_weight: bool = True  # a learned gain in every norm (false: parameter-free)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    n_kv_head: Optional[int] = None  # key/value heads, shared by groups of query heads (null: n_head, no sharing)
    tie_embeddings: bool = True  # the output head is the token embedding (GPT-2); false: a matrix of its own
    logit_softcap: Optional[float] = None  # squash the logits into (-cap, cap) with cap * tanh(x / cap) (null: off)
    zero_init_proj: bool = False  # start the attention and MLP output projections at zero (each block an identity)
    depth: Optional[int] = None  # the depth flavours' one dial (model=modern_gpu): n_layer, n_embd, n_head follow it

    def __post_init__(self) -> None:
        """Checked when the config is composed: ValueError(what went wrong, how to fix it)."""
        for key in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}", "set a positive size")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}",
                "choose n_embd as a multiple of n_head, e.g. model.n_embd=384 model.n_head=6",
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError("model.vocab_size must be >= 1", "or null for the data's")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}", "e.g. 0.0 or 0.2")
        for key, allowed in (("activation", ACTIVATIONS), ("positions", POSITIONS), ("norm", NORMS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"unknown model.{key} '{getattr(self, key)}'", f"use one of: {', '.join(allowed)}")
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(
                f"model.n_kv_head={self.n_kv_head} does not divide model.n_head={self.n_head}",
                "use a divisor of n_head (n_head itself: no sharing), or null",
            )
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"model.positions=rope needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}",
                "choose model.n_embd and model.n_head so that n_embd / n_head is even",
            )
        if self.depth is not None and self.depth != self.n_layer:
            raise ValueError(
                f"model.depth={self.depth} but model.n_layer={self.n_layer}: only the depth flavours derive the shape"
                " from depth",
                "use model=modern_gpu model.depth=N and no model.n_layer, or model.depth=null",
            )
        if self.rope_base <= 1 or (self.logit_softcap is not None and self.logit_softcap <= 0):
            raise ValueError("model.rope_base must be > 1 and model.logit_softcap > 0", "e.g. 10000 and 15, or null")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: 4x, or 8/3x rounded up to a multiple of 64 for SwiGLU's three matrices."""
        return 4 * self.n_embd if self.activation != "swiglu" else -(-8 * self.n_embd // 3 // 64) * 64


# The cos and sin of every position's rotation angles, for rotary positions (GPT.forward passes them down).
Rotation = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    """Every layer's keys and values of the positions seen so far, so that generation feeds the model
    only the new token at each step instead of the whole context again.

    The buffers hold `block_size` positions and are allocated at the first write, in the dtype the
    keys come in (autocast's). `length` counts the positions fed so far. With rotary positions the cache
    goes on past `block_size`, one token at a time: each new position takes the slot of the oldest one.
    Attention over a set of keys does not depend on their order, and each rotated key carries its own
    position, so the window slides with no prefill again.

    A decode step can also run in shapes that never change, which torch.compile compiles once: with
    `position` set (a 0-dim tensor, the new token's position), the new keys go to slot position % block_size
    and attention reads every slot, masked to those filled (`write_at`); the caller then advances `length`.
    """

    def __init__(self, n_layer: int, block_size: int) -> None:
        self.block_size = block_size
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0
        self.position: torch.Tensor | None = None  # set for a static-shape decode step

    def write_at(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store one new position's k, v (B, nh, 1, hs) at its slot of the (already filled) buffers; returns
        the whole buffers and the mask (1, 1, 1, block_size) of the slots that hold a position."""
        keys, values, position = self.keys[layer], self.values[layer], self.position
        assert keys is not None and values is not None and position is not None, "prefill before a static step"
        slot = (position % self.block_size).view(1)
        keys.index_copy_(2, slot, k)
        values.index_copy_(2, slot, v)
        filled = torch.arange(self.block_size, device=k.device) <= position
        return keys, values, filled.view(1, 1, 1, -1)

    def reset(self) -> None:
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v (B, nh, T, hs) after the cached ones; returns all of them."""
        cached = self.keys[layer]
        if cached is None or cached.shape[0] != k.shape[0] or cached.dtype != k.dtype:
            assert self.length == 0, "the batch or dtype changed in the middle of a cached sequence"
            shape = (k.shape[0], k.shape[1], self.block_size, k.shape[3])
            self.keys[layer] = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.values[layer] = torch.zeros(shape, dtype=v.dtype, device=v.device)
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None
        end = self.length + k.shape[2]
        if end > self.block_size:  # sliding, one position (GPT.forward allows nothing else)
            slot = self.length % self.block_size
            keys[:, :, slot : slot + 1], values[:, :, slot : slot + 1] = k, v
            return keys, values
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


def norm(config: GPTConfig) -> nn.Module:
    """The normalisation every block (and the final one) uses: LayerNorm or RMSNorm, gain or none."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, elementwise_affine=config.norm_weight)
    return nn.LayerNorm(config.n_embd, elementwise_affine=config.norm_weight, bias=config.bias and config.norm_weight)


def rotary_table(config: GPTConfig, positions: torch.Tensor) -> Rotation:
    """cos and sin (positions, head_size / 2) of the rotation angles of `positions` (1-D, on their device),
    one frequency per pair. The angles are taken in float64, so that positions far past the block (a
    sliding KV cache) rotate as exactly as the first ones."""
    head_size = config.n_embd // config.n_head
    steps = torch.arange(0, head_size, 2, dtype=torch.float32, device=positions.device)
    frequencies = config.rope_base ** -(steps / head_size)
    angles = torch.outer(positions.double(), frequencies.double())
    return angles.cos().float(), angles.sin().float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (first half, second half) of x's (B, nh, T, hs) head dimensions by its angle at
    its position: attention scores then depend on how far apart two positions are, not where they are."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


def sliding_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, dropout: float = 0.0
) -> torch.Tensor:
    """Causal attention in which each position sees the `window` positions up to itself, what a sliding
    KV cache computes one token at a time; taken `window` queries at a time, so memory grows with the
    sequence's length, not its square."""
    T = q.size(2)
    out = []
    for first in range(0, T, window):
        last, oldest = min(first + window, T), max(0, first - window + 1)
        i = torch.arange(first, last, device=q.device)[:, None]
        j = torch.arange(oldest, last, device=q.device)[None, :]
        mask = (j <= i) & (j > i - window)
        keys, values = k[:, :, oldest:last], v[:, :, oldest:last]
        out.append(F.scaled_dot_product_attention(q[:, :, first:last], keys, values, attn_mask=mask, dropout_p=dropout))
    return torch.cat(out, dim=2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.kv_heads
        self.head_size = config.n_embd // config.n_head
        # query, key and value projections for all heads, in one matmul (fewer key/value heads with GQA)
        self.kv_width = self.n_kv_head * self.head_size
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.window = config.block_size  # past it (rotary positions only) attention slides

    def forward(
        self, x: torch.Tensor, rope: Rotation | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding width
        q, k, v = self.c_attn(x).split([C, self.kv_width, self.kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, n_kv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, n_kv, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None and cache.position is not None:  # a static-shape decode step (see KVCache)
            k, v, mask = cache.write_at(layer, k, v)
            causal = False
        elif cache is None or cache.length == 0:
            mask, causal = None, True  # the usual triangle
        elif T == 1:  # one new position: it sees every cached one
            mask, causal = None, False
        else:  # new positions after `cache.length` cached ones: each sees those and the new ones up to itself
            mask, causal = torch.ones(T, cache.length + T, dtype=torch.bool, device=x.device).tril(cache.length), False
        if cache is not None and cache.position is None:
            k, v = cache.update(layer, k, v)
        if self.n_kv_head != self.n_head:  # each key/value head serves a group of query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout = self.dropout if self.training else 0.0
        if x.size(1) > self.window:  # a sequence longer than the block (rotary positions): each position sees a block
            y = sliding_attention(q, k, v, self.window, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Up to 4x the width, a nonlinearity, back down. SwiGLU gates instead: silu(gate) * up, with a hidden
    width of 8/3 x (rounded up to a multiple of 64) so that its three matrices hold what the others' two do."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        hidden = config.mlp_hidden
        gated = 2 if self.activation == "swiglu" else 1  # gate and up in one matmul
        self.c_fc = nn.Linear(config.n_embd, gated * hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rope: Rotation | None = None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size must be set before building the model")
        self.config = replace(config)  # our own copy: crop_block_size changes it
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": norm(config),
            }
        )
        if config.positions == "learned":
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        else:  # the rotations of every position, computed once (not saved: they follow from the config)
            cos, sin = rotary_table(config, torch.arange(config.block_size))
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # the input embedding and the output head share one matrix (GPT-2 does this)
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # scaled init of the residual projections, per the GPT-2 paper: keeps the residual stream's
        # variance from growing with depth; or zero, so that each block starts as the identity
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters by role, for optimizers that treat them differently (Muon, weight decay):
        `matrices` are the blocks' 2-D weights, `embeddings` the token and position tables, `head` the
        output head when it is untied (tied, it is the token table), `vectors` the gains and biases."""
        groups: dict[str, list[nn.Parameter]] = {"matrices": [], "embeddings": [], "head": [], "vectors": []}
        for name, param in self.named_parameters():  # a tied parameter is listed once, as the token table
            if param.dim() < 2:
                groups["vectors"].append(param)
            elif name.startswith(("transformer.wte.", "transformer.wpe.")):
                groups["embeddings"].append(param)
            elif name.startswith("lm_head."):
                groups["head"].append(param)
            else:
                groups["matrices"].append(param)
        return groups

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without learned position embeddings (the token embedding is
        tied to the head, or the head is a matrix of its own: either way a real weight)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), per the PaLM paper's appendix B."""
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.block_size

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position of `idx` (B, T), and the cross-entropy when `targets` is given: its mean
        or its `reduction="sum"` over the targets other than -1 (a masked target: no loss, no gradient).

        With a `cache`, `idx` continues the positions already in it, and its keys and values are added.
        Rotary models go past `block_size`, each position attending to the block_size positions up to
        itself: a longer `idx`, or a cache fed one token at a time. With the cache's `position` set, `idx`
        is one token per sequence at that position, in shapes that do not change (see KVCache).
        """
        _, t = idx.size()
        static = cache is not None and cache.position is not None
        start = cache.length if cache is not None and not static else 0
        slides = self.config.positions == "rope" and (cache is None or t == 1)
        if start + t > self.config.block_size and not slides:
            raise ValueError(f"sequence of length {start + t} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        positions = cache.position.view(1) if static else torch.arange(start, start + t, device=idx.device)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        elif static:
            rope = rotary_table(self.config, positions)
        elif start + t > self.config.block_size:  # past the table: on the host, for MPS lacks float64
            cos, sin = rotary_table(self.config, torch.arange(start, start + t))
            rope = (cos.to(idx.device), sin.to(idx.device))
        else:
            rope = (self.rope_cos[start : start + t], self.rope_sin[start : start + t])
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer)
        if cache is not None and not static:  # a static step's caller advances the cache
            cache.length += t
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length (e.g. load GPT-2's 1024 and train at 256): drops position rows."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot grow block_size from {self.config.block_size} to {block_size}")
        self.config.block_size = block_size
        for block in self.transformer.h:
            block.attn.window = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
        else:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]

    def add_tokens(self, known: int, vocab_size: int) -> None:
        """Make every row from `known` on a new token's (special tokens the model never saw, such as a chat
        template's), each starting as the mean of the `known` rows: a neutral embedding and logit, not a
        random or leftover one. The table first grows to `vocab_size` rows if it has fewer."""
        old = self.config.vocab_size
        assert old is not None and known <= old
        if vocab_size > old:
            grown = []
            for weight in (self.transformer.wte.weight, self.lm_head.weight):
                grown.append(
                    nn.Parameter(torch.cat([weight.detach(), weight.new_zeros(vocab_size - old, weight.size(1))]))
                )
            self.transformer.wte.weight, self.lm_head.weight = grown
            if self.config.tie_embeddings:
                self.transformer.wte.weight = self.lm_head.weight
            self.transformer.wte.num_embeddings = self.lm_head.out_features = self.config.vocab_size = vocab_size
        with torch.no_grad():
            for weight in {self.transformer.wte.weight, self.lm_head.weight}:
                weight[known:] = weight[:known].mean(0)
