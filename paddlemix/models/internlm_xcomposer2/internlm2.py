"""The InternLM2 decoder: RMSNorm, rotary embeddings, GQA attention over a packed Wqkv,
SwiGLU feed-forward, all five linears of each layer being PLoRA.

The decoder knows nothing about images except which rows are image rows
(:class:`~.plora.ImageRows`), decided once per forward by the caller.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from .configuration import InternLMXComposer2Config
from .kv_cache import KVCache
from .plora import ImageRows, PLoRALinear

__all__ = [
    "RMSNorm",
    "rope_base",
    "rope_inv_freq",
    "rotary_cos_sin",
    "apply_rotary",
    "causal_mask",
    "grouped_attention",
    "InternLM2Model",
]


class RMSNorm(nn.Layer):
    """``w * x / sqrt(mean(x²) + eps)``, computed in float32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.eps = eps

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = x.astype("float32")
        h = h * paddle.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.astype(x.dtype)


# --- rotary position embedding --------------------------------------------------------------
def rope_base(config: InternLMXComposer2Config, seq_len: int) -> float:
    """RoPE base for a sequence of ``seq_len`` tokens: dynamic NTK rescales it past
    ``max_position_embeddings`` M: ``θ·(f·L/M − (f−1))^(d/(d−2))``. A pure function of
    the length (the official module also keeps the rescaled base as state; we don't)."""
    scaling = config.rope_scaling or {}
    limit = config.max_position_embeddings
    if scaling.get("type") != "dynamic" or seq_len <= limit:
        return float(config.rope_theta)
    factor = float(scaling.get("factor", 1.0))
    dim = config.head_dim
    return float(config.rope_theta) * ((factor * seq_len / limit) - (factor - 1)) ** (dim / (dim - 2))


def rope_inv_freq(head_dim: int, base: float) -> paddle.Tensor:
    """``1 / base^(arange(0, d, 2)/d)`` in float32, ``[d/2]``."""
    exponents = paddle.arange(0, head_dim, 2, dtype="float32") / head_dim
    return 1.0 / (paddle.full([], base, dtype="float32") ** exponents)


def rotary_cos_sin(positions: paddle.Tensor, inv_freq: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """``positions`` float32 ``[..., t]`` → ``cos, sin`` ``[..., t, d]`` (``emb = cat(f, f)``)."""
    freqs = positions.unsqueeze(-1) * inv_freq
    emb = paddle.concat([freqs, freqs], axis=-1)
    return paddle.cos(emb), paddle.sin(emb)


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotate-half RoPE. ``x`` ``[b, t, h, d]``; ``cos``/``sin`` ``[t, d]`` or ``[b, t, d]``."""
    if cos.ndim == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2).astype(x.dtype), sin.unsqueeze(2).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = paddle.concat([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --- attention ------------------------------------------------------------------------------
def causal_mask(new_tokens: int, past: int, attention_mask: Optional[paddle.Tensor]) -> Optional[paddle.Tensor]:
    """Additive float32 mask ``[b|1, 1, t, past + t]``: 0 where a query may attend, float32-min
    elsewhere (as HF: a fully masked row stays finite instead of becoming NaN).

    ``attention_mask`` ``[b, past + t]`` (1 = real token) adds padding. Returns ``None``
    when nothing is masked (one new token, no padding), so decoding skips the add.
    """
    total = past + new_tokens
    if attention_mask is None and new_tokens == 1:
        return None
    keys = paddle.arange(total).unsqueeze(0)
    queries = paddle.arange(past, total).unsqueeze(1)
    allowed = (keys <= queries).unsqueeze(0)  # [1, t, L]
    if attention_mask is not None:
        allowed = paddle.logical_and(allowed, attention_mask.astype("bool").unsqueeze(1))
    zero = paddle.zeros([], dtype="float32")
    minimum = paddle.full([], paddle.finfo(paddle.float32).min, dtype="float32")
    return paddle.where(allowed, zero, minimum).unsqueeze(1)


def grouped_attention(
    q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: Optional[paddle.Tensor]
) -> paddle.Tensor:
    """Softmax attention with grouped kv heads, without repeating k/v.

    ``q`` ``[b, t, nh, d]``; ``k``, ``v`` ``[b, nkv, L, d]``; ``mask`` ``[b|1, 1, t, L]``.
    Query head ``h`` uses kv head ``h // (nh/nkv)``. Scores and softmax in float32.
    Returns ``[b, t, nh, d]``.
    """
    b, t, nh, d = q.shape
    nkv, total = k.shape[1], k.shape[2]
    groups = nh // nkv
    qg = q.reshape([b, t, nkv, groups, d]).transpose([0, 2, 3, 1, 4]).reshape([b, nkv, groups * t, d])
    scores = paddle.matmul(qg, k, transpose_y=True).astype("float32") * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores.reshape([b, nkv, groups, t, total]) + mask.unsqueeze(1)
        scores = scores.reshape([b, nkv, groups * t, total])
    probs = F.softmax(scores, axis=-1).astype(v.dtype)
    out = paddle.matmul(probs, v).reshape([b, nkv, groups, t, d])
    return out.transpose([0, 3, 1, 2, 4]).reshape([b, t, nh, d])


class InternLM2Attention(nn.Layer):
    def __init__(self, config: InternLMXComposer2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        lora = dict(lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.wqkv = PLoRALinear(config.hidden_size, qkv_out, bias=config.bias, **lora)
        self.wo = PLoRALinear(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias, **lora)

    def forward(
        self,
        x: paddle.Tensor,
        rope: Tuple[paddle.Tensor, paddle.Tensor],
        mask: Optional[paddle.Tensor],
        image_rows: Optional[ImageRows],
        cache: Optional[KVCache],
        layer_idx: int,
    ) -> paddle.Tensor:
        b, t, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        # Packed layout, per kv head: its `groups` query heads, then k, then v.
        qkv = self.wqkv(x, image_rows).reshape([b, t, self.num_kv_heads, groups + 2, self.head_dim])
        q = qkv[:, :, :, :groups].reshape([b, t, self.num_heads, self.head_dim])
        k, v = qkv[:, :, :, groups], qkv[:, :, :, groups + 1]
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k, v = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = grouped_attention(q, k, v, mask)
        return self.wo(out.reshape([b, t, self.num_heads * self.head_dim]), image_rows)


class InternLM2MLP(nn.Layer):
    def __init__(self, config: InternLMXComposer2Config) -> None:
        super().__init__()
        lora = dict(lora_r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
        hidden, inter = config.hidden_size, config.intermediate_size
        self.w1 = PLoRALinear(hidden, inter, bias=False, **lora)
        self.w3 = PLoRALinear(hidden, inter, bias=False, **lora)
        self.w2 = PLoRALinear(inter, hidden, bias=False, **lora)

    def forward(self, x: paddle.Tensor, image_rows: Optional[ImageRows]) -> paddle.Tensor:
        return self.w2(F.silu(self.w1(x, image_rows)) * self.w3(x, image_rows), image_rows)


class InternLM2DecoderLayer(nn.Layer):
    def __init__(self, config: InternLMXComposer2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = InternLM2Attention(config)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: paddle.Tensor,
        rope: Tuple[paddle.Tensor, paddle.Tensor],
        mask: Optional[paddle.Tensor],
        image_rows: Optional[ImageRows],
        cache: Optional[KVCache],
    ) -> paddle.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask, image_rows, cache, self.layer_idx)
        return x + self.feed_forward(self.ffn_norm(x), image_rows)


class InternLM2Model(nn.Layer):
    """Token embeddings, decoder layers, final norm (``model.*`` in the checkpoint)."""

    def __init__(self, config: InternLMXComposer2Config) -> None:
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.LayerList([InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # PaddleNLP's Trainer sets ``enable_recompute`` on every layer that has it (``recompute: true``).
        self.enable_recompute = False

    def embed(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        """Token embeddings. As torch's ``nn.Embedding(padding_idx=pad)`` in the official model,
        the pad row (= ``</s>``) gets no gradient; unlike Paddle's ``padding_idx``, its
        output is the stored row, not zeros."""
        emb = self.tok_embeddings(input_ids)
        if self.training and not self.tok_embeddings.weight.stop_gradient and self.padding_idx is not None:
            is_pad = (input_ids == self.padding_idx).unsqueeze(-1)
            emb = paddle.where(is_pad, emb.detach(), emb)
        return emb

    def rope(self, past: int, new_tokens: int, position_ids: Optional[paddle.Tensor]) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """cos/sin for this forward; the base depends on the total length ``past + t``."""
        base = rope_base(self.config, past + new_tokens)
        if position_ids is None:
            positions = paddle.arange(past, past + new_tokens, dtype="float32")
        else:
            positions = position_ids.astype("float32")
        return rotary_cos_sin(positions, rope_inv_freq(self.config.head_dim, base))

    def forward(
        self,
        inputs_embeds: paddle.Tensor,
        attention_mask: Optional[paddle.Tensor] = None,
        image_rows: Optional[ImageRows] = None,
        cache: Optional[KVCache] = None,
        position_ids: Optional[paddle.Tensor] = None,
        output_hidden_states: bool = False,
    ) -> Tuple[paddle.Tensor, Optional[List[paddle.Tensor]]]:
        """``inputs_embeds`` ``[b, t, H]`` → final-normed hidden ``[b, t, H]`` (+ all hidden states:
        embeddings, each layer's output but the last, then the normed output, as HF does)."""
        new_tokens = inputs_embeds.shape[1]
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(new_tokens)
        rope = self.rope(past, new_tokens, position_ids)
        mask = causal_mask(new_tokens, past, attention_mask)
        hidden: List[paddle.Tensor] = []
        x = inputs_embeds
        recompute_layers = self.enable_recompute and self.training
        if recompute_layers and x.stop_gradient:
            # Recompute only checkpoints a block whose input needs a gradient; with frozen
            # embeddings (LoRA) it would silently keep every activation instead.
            x = x.detach()
            x.stop_gradient = False
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            if recompute_layers:
                x = recompute(layer, x, rope, mask, image_rows, cache, use_reentrant=False)
            else:
                x = layer(x, rope, mask, image_rows, cache)
        if cache is not None:
            cache.commit(new_tokens)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, (hidden if output_hidden_states else None)
