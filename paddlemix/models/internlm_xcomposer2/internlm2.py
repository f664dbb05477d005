"""The InternLM2 decoder: RMSNorm, GQA attention over a packed Wqkv with rotary embeddings,
SwiGLU feed-forward, all five linears of each layer being PLoRA.

The decoder knows nothing about images except which rows are image rows
(:class:`~.plora.ImageRows`), decided once per forward by the caller.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute

from .configuration import InternLMXComposer2Config
from .fast_decode import can_decode_fast, decode_layers
from .kernels import rms_norm, softmax_last, use_fused_norm
from .kv_cache import KVCache
from .plora import ImageRows, PLoRALinear
from .rope import Rotary, rotary_for

__all__ = ["RMSNorm", "causal_mask", "decode_mask", "step_mask", "expand_mask", "grouped_attention",
           "InternLM2Model"]

MASK_EXPAND_LIMIT = 16 * 1024**2  # elements (64 MB in float32) of an expanded mask / rotary table


class RMSNorm(nn.Layer):
    """``w * x / sqrt(mean(x²) + eps)``, computed in float32 whatever the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = self.create_parameter([hidden_size], default_initializer=nn.initializer.Constant(1.0))
        self.eps = eps

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if not paddle.is_grad_enabled():  # inference: fused where the machine can run it (no CPU backward)
            return rms_norm(x, self.weight, self.eps, use_fused_norm(x))[0]
        h = x if x.dtype == paddle.float32 else x.astype("float32")
        h = h * paddle.rsqrt((h * h).mean(-1, keepdim=True) + self.eps)  # h*h: pow(2) is far slower on CPU
        return self.weight * h.astype(x.dtype)


# --- attention ------------------------------------------------------------------------------
def causal_mask(new_tokens: int, past: int, key_length: int,
                attention_mask: Optional[paddle.Tensor] = None) -> Optional[paddle.Tensor]:
    """Additive float32 mask ``[b|1, t, key_length]``: 0 where query ``past + i`` may attend
    key ``j`` (``j <= past + i`` and, with ``attention_mask`` ``[b, ≥ past + t]``, a real
    token), float32-min elsewhere (as HF: a fully masked row stays finite). Keys past the
    written ones (an unfilled cache tail) are in the future, hence masked. ``None`` when
    nothing needs masking (one token attending exactly its prefix, no padding)."""
    if attention_mask is None and new_tokens == 1 and key_length == past + 1:
        return None
    keys = paddle.arange(key_length).unsqueeze(0)
    queries = paddle.arange(past, past + new_tokens).unsqueeze(1)
    allowed = (keys <= queries).unsqueeze(0)  # [1, t, L]
    if attention_mask is not None:
        real = attention_mask.astype("bool")
        if real.shape[1] < key_length:
            real = paddle.concat([real, paddle.zeros([real.shape[0], key_length - real.shape[1]], "bool")], 1)
        allowed = paddle.logical_and(allowed, real[:, :key_length].unsqueeze(1))
    zero = paddle.zeros([], dtype="float32")
    minimum = paddle.full([], paddle.finfo(paddle.float32).min, dtype="float32")
    return paddle.where(allowed, zero, minimum)


def decode_mask(past: int, key_length: int, batch: int, kv_heads: int, groups: int) -> paddle.Tensor:
    """:func:`expand_mask` of :func:`causal_mask` for one new token without padding, built on the
    host and sent in one transfer (the device ops would cost more than the attention they mask)."""
    row = np.where(np.arange(key_length) <= past, 0.0, np.finfo(np.float32).min).astype(np.float32)
    shape = [batch, kv_heads, groups, key_length]
    if batch * kv_heads * groups * key_length > MASK_EXPAND_LIMIT:
        shape = [1, 1, key_length]
    return paddle.to_tensor(np.broadcast_to(row, shape))


def step_mask(cache: KVCache, batch: int, kv_heads: int, groups: int) -> paddle.Tensor:
    """:func:`decode_mask` for the coming one-token step over the whole cache buffer, reusing the
    previous step's mask: each step opens one more key position, written in place (one small
    op instead of building and sending a new mask every token)."""
    past = cache.length
    previous = cache.step_mask
    if previous is not None and previous[1:] == (past - 1, cache.capacity, batch):
        mask = previous[0]
        mask[..., past] = 0.0
    else:
        mask = decode_mask(past, cache.capacity, batch, kv_heads, groups)
    cache.step_mask = (mask, past, cache.capacity, batch)
    return mask


def expand_mask(mask: Optional[paddle.Tensor], batch: int, kv_heads: int, groups: int) -> Optional[paddle.Tensor]:
    """``[1|b, t, L]`` → the scores' own shape ``[b, nkv, groups·t, L]`` (rows ordered group,
    position), once per forward, so every layer adds it without broadcasting (Paddle's CPU
    broadcast add is ~8x slower: a left-padded batch of 4 × 405 tokens prefilled 1.3x slower
    with the broadcast) — unless that copy would be large (long training sequences)."""
    if mask is None:
        return mask
    rows, t, total = mask.shape
    if batch * kv_heads * groups * t * total > MASK_EXPAND_LIMIT:
        return mask
    return mask.reshape([rows, 1, 1, t, total]).expand([batch, kv_heads, groups, t, total]).reshape(
        [batch, kv_heads, groups * t, total])


def grouped_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, mask: Optional[paddle.Tensor],
                      scale: Optional[float] = None) -> paddle.Tensor:
    """Softmax attention with grouped kv heads, without repeating k/v.

    ``q`` ``[b, t, nkv, groups, d]`` (query head ``kv·groups + g``); ``k``, ``v``
    ``[b, nkv, L, d]``; ``mask`` additive, ``[b|1, t, L]`` or already in the scores' shape
    ``[b, nkv, groups·t, L]`` (:func:`expand_mask`). ``scale`` multiplies q·k (default
    ``1/sqrt(d)``; pass 1.0 when q and k were pre-scaled). Softmax in float32.
    Returns ``[b, t, nkv·groups·d]``.
    """
    b, t, nkv, groups, d = q.shape
    total = k.shape[2]
    # the queries of one kv head side by side, rows ordered (group, position)
    qg = q.reshape([b, nkv, groups, d]) if t == 1 else q.transpose([0, 2, 3, 1, 4]).reshape([b, nkv, groups * t, d])
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = paddle.matmul(qg if scale == 1.0 else qg * scale, k, transpose_y=True)
    if scores.dtype != paddle.float32:
        scores = scores.astype("float32")
    if mask is not None:
        if mask.ndim == 3:  # not expanded: broadcast over the heads
            # one mask for all rows as a [t, L] operand: Paddle's CPU add broadcasts trailing
            # dimensions ~2x faster than a [1, 1, t, L] one
            mask = mask.unsqueeze(1) if mask.shape[0] == b and b > 1 else mask.reshape([t, total])
            scores = (scores.reshape([b, nkv * groups, t, total]) + mask).reshape([b, nkv, groups * t, total])
        elif paddle.is_grad_enabled():
            scores = scores + mask
        else:
            scores.add_(mask)  # in place: no new [heads, t, L] tensor in a long prefill
    probs = softmax_last(scores)  # scores is a temporary: may be overwritten
    out = paddle.matmul(probs if probs.dtype == v.dtype else probs.astype(v.dtype), v)  # [b, nkv, groups*t, d]
    if t == 1:
        return out.reshape([b, 1, nkv * groups * d])
    return out.reshape([b, nkv, groups, t, d]).transpose([0, 3, 1, 2, 4]).reshape([b, t, nkv * groups * d])


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
        rotary: Rotary,
        mask: Optional[paddle.Tensor],
        image_rows: Optional[ImageRows],
        cache: Optional[KVCache],
        layer_idx: int,
    ) -> paddle.Tensor:
        b, t, _ = x.shape
        groups, nkv, hd = self.num_heads // self.num_kv_heads, self.num_kv_heads, self.head_dim
        # Packed layout, per kv head: its `groups` query heads, then k, then v. The query
        # heads and k are adjacent, so one rotation covers both. Cut with split, not slices:
        # a slice's gradient is a zero tensor of the whole input with the slice written into
        # it (one per slice; ~20% of a CPU training step), split's is one concat.
        qkv = self.wqkv(x, image_rows).reshape([b, t, nkv, groups + 2, hd])
        qk, v = paddle.split(qkv, [groups + 1, 1], axis=3)
        q, k = paddle.split(rotary(qk), [groups, 1], axis=3)
        k, v = k.squeeze(3), v.squeeze(3)
        if t == 1:
            k, v = k.reshape([b, nkv, 1, hd]), v.reshape([b, nkv, 1, hd])
        else:
            k, v = k.transpose([0, 2, 1, 3]), v.transpose([0, 2, 1, 3])
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        return self.wo(grouped_attention(q, k, v, mask, scale=1.0), image_rows)  # pre-scaled by the rotation


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
        rope: Rotary,
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
        cfg = self.config
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        qk_shape = [inputs_embeds.shape[0], new_tokens, cfg.num_key_value_heads, groups + 1, cfg.head_dim]
        # q and k both scaled by d^-1/4 inside the rotation: their product carries the 1/sqrt(d)
        # of attention, so no layer spends an op on it (the cache holds the scaled keys)
        rope = rotary_for(cfg, past, new_tokens, position_ids, scale=cfg.head_dim**-0.25, holder=cache).expanded(
            qk_shape, MASK_EXPAND_LIMIT)
        key_length = cache.key_length(new_tokens) if cache is not None else new_tokens
        if attention_mask is None and new_tokens == 1 and key_length > past + 1:
            mask = step_mask(cache, inputs_embeds.shape[0], cfg.num_key_value_heads, groups)
        else:
            mask = expand_mask(causal_mask(new_tokens, past, key_length, attention_mask), inputs_embeds.shape[0],
                               cfg.num_key_value_heads, groups)
        if not output_hidden_states and can_decode_fast(self.layers, self.norm, new_tokens, cache, image_rows,
                                                        rope.matrix):
            x = decode_layers(cache.fast_decode, inputs_embeds, rope.matrix, mask, cache)
            cache.commit(new_tokens)
            return x, None
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
