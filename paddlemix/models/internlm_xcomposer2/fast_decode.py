"""One decode step (a single new text token per row, KV cache, no gradient) through the
decoder layers with as little per-op overhead as the framework allows.

Decoding a small or GPU-resident model is bound by per-op dispatch, not arithmetic: the
layer-by-layer path (``InternLM2DecoderLayer``) spends ~10 ``Layer.__call__``s, Python
wrappers and 27 ops per layer. Here the same kernels compute the same values — bit-identical
in float32 (tested against the layers) — in 21 ops per layer:

* the residual add is fused into the following RMSNorm (``fused_rms_norm(..., residual=x)``
  returns ``norm(a + x)`` and ``a + x``), saving two ops per layer (in bfloat16 the fused add
  may round differently from a separate one);
* the rotation multiplies all of q, k and v (v's rotated copy is unused): its input stays
  contiguous, so no copy, and no slice before it;
* kernels are called directly (``_C_ops``, as PaddleNLP's own fused paths do), without the
  Python argument checking of the public wrappers; no PLoRA (generated tokens are text) and
  no ``Layer.__call__`` per linear.

Only used when it computes exactly what the layers would: plain ``PLoRALinear`` linears
(not wrapped by ``paddlenlp.peft``), no hooks, a rotation matrix (one new token), a cache
that already holds the prompt. Anything else takes the layer-by-layer path.
"""
from __future__ import annotations

from typing import Optional, Sequence

import paddle
from paddle import _C_ops

from .kv_cache import KVCache
from .plora import PLoRALinear

__all__ = ["can_decode_fast", "decode_layers"]

_LINEARS = (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"), ("feed_forward", "w3"),
            ("feed_forward", "w2"))


def _plain(layer: paddle.nn.Layer) -> bool:
    """No hooks anywhere and every linear exactly a ``PLoRALinear`` (e.g. not a peft LoRA wrapper).
    Reads the sublayer dicts directly: ``Layer.__getattr__`` here would cost ~1 ms per token."""
    parts = layer._sub_layers
    linears = [parts[part]._sub_layers[name] for part, name in _LINEARS]
    modules = [layer, *parts.values(), *linears]
    return (all(type(m) is PLoRALinear for m in linears)
            and not any(m._forward_pre_hooks or m._forward_post_hooks for m in modules))


def can_decode_fast(layers: Sequence[paddle.nn.Layer], new_tokens: int, cache: Optional[KVCache],
                    image_rows, rotation: Optional[paddle.Tensor]) -> bool:
    """Whether :func:`decode_layers` computes exactly what the layers would for this forward.
    The layer check is made once per cache (one generation: its layers do not change midway)."""
    if not (new_tokens == 1 and cache is not None and cache.length > 0 and image_rows is None
            and rotation is not None and not paddle.is_grad_enabled()):
        return False
    if cache.fast_decode is None:
        cache.fast_decode = all(_plain(layer) for layer in layers)
    return cache.fast_decode


def _linear(x: paddle.Tensor, linear: PLoRALinear) -> paddle.Tensor:
    params = linear._parameters  # dict lookups: Layer.__getattr__ costs more than a small kernel
    y = _C_ops.matmul(x, params["weight"], False, False)
    bias = params.get("bias")
    return y if bias is None else _C_ops.add(y, bias)


def _rms(x: paddle.Tensor, norm, residual: Optional[paddle.Tensor]):
    """``(norm(x + residual), x + residual)`` in one kernel (``residual`` None: ``(norm(x), x)``)."""
    out = _C_ops.fused_rms_norm_quant(x, None, residual, norm._parameters["weight"], None, norm.eps, x.ndim - 1,
                                      -1.0, 0, 0.0, 0.0)
    return out[0], (out[1] if residual is not None else x)


def decode_layers(layers: Sequence[paddle.nn.Layer], x: paddle.Tensor, rotation: paddle.Tensor,
                  mask: Optional[paddle.Tensor], cache: KVCache, final_norm) -> paddle.Tensor:
    """``x`` ``[b, 1, H]`` embeddings → final-normed hidden ``[b, 1, H]``, writing each layer's
    key/value at position ``cache.length`` (the caller commits). ``rotation`` ``[b|1, 1, 1, d, d]``
    (scaled, see ``rotary_for``); ``mask`` additive ``[b, nkv, groups, L]``, ``[b, 1, L]`` or ``None``."""
    b = x.shape[0]
    pos = cache.length
    if mask is not None and mask.ndim == 3:  # [b, 1, L] (padding): broadcast over heads and groups
        mask = _C_ops.reshape(mask, [mask.shape[0], 1, 1, mask.shape[-1]])
    # one token: the layer works on [b, nkv, heads, d] (query heads, then k, then v per kv head)
    rotation = _C_ops.reshape(rotation, [rotation.shape[0], 1, rotation.shape[-2], rotation.shape[-1]])
    if rotation.dtype != x.dtype:  # once per step, not per layer
        rotation = _C_ops.cast(rotation, x.dtype)
    pending = None  # the previous block's output, not yet added to the residual stream x
    for idx, layer in enumerate(layers):
        parts = layer._sub_layers
        att, ffn = parts["attention"], parts["feed_forward"]
        att_linears, ffn_linears = att._sub_layers, ffn._sub_layers
        nkv, hd = att.num_kv_heads, att.head_dim
        groups = att.num_heads // nkv
        h, x = _rms(pending if pending is not None else x, parts["attention_norm"],
                    x if pending is not None else None)
        qkv = _C_ops.reshape(_linear(h, att_linears["wqkv"]), [b, nkv, groups + 2, hd])
        # rotating v as well keeps the matmul's input contiguous (a slice first would be copied);
        # v is then taken from the unrotated qkv
        rotated = _C_ops.matmul(qkv, rotation, False, False)
        keys, values = cache.keys[idx], cache.values[idx]
        _C_ops.set_value_with_tensor_(keys, _C_ops.slice(rotated, [2], [groups], [groups + 1], [1], []),
                                      [pos], [pos + 1], [1], [2], [], [])
        _C_ops.set_value_with_tensor_(values, _C_ops.slice(qkv, [2], [groups + 1], [groups + 2], [1], []),
                                      [pos], [pos + 1], [1], [2], [], [])
        q = _C_ops.slice(rotated, [2], [0], [groups], [1], [])
        scores = _C_ops.matmul(q, keys, False, True)  # q, k pre-scaled by the rotation
        if scores.dtype != paddle.float32:
            scores = _C_ops.cast(scores, paddle.float32)
        if mask is not None:
            scores = _C_ops.add_(scores, mask)
        probs = _C_ops.softmax(scores, -1)
        if probs.dtype != values.dtype:
            probs = _C_ops.cast(probs, values.dtype)
        attended = _C_ops.reshape(_C_ops.matmul(probs, values, False, False), [b, 1, att.num_heads * hd])
        h, x = _rms(_linear(attended, att_linears["wo"]), parts["ffn_norm"], x)
        gate = _C_ops.silu(_linear(h, ffn_linears["w1"]))
        pending = _linear(_C_ops.multiply(gate, _linear(h, ffn_linears["w3"])), ffn_linears["w2"])
    return _rms(pending, final_norm, x)[0]
