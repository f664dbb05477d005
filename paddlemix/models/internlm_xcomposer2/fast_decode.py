"""One decode step (a single new text token per row, KV cache, no gradient) through the
decoder layers with as little per-op overhead as the framework allows.

Decoding a small or GPU-resident model is bound by per-op dispatch, not arithmetic: the
layer-by-layer path (``InternLM2DecoderLayer``) spends ~10 ``Layer.__call__``s, Python
wrappers and ~28 ops per layer. Here the same kernels compute the same values — bit-identical
in float32 (tested against the layers, on either norm kernel) — in 20 ops per layer (24 with
the plain norm):

* where the machine has a fused RMSNorm (:mod:`.kernels`: GPU, or CPU with AVX-512), the
  residual add is fused into the following norm (``fused_rms_norm(..., residual=x)`` returns
  ``norm(a + x)`` and ``a + x``), saving two ops per layer (in bfloat16 the fused add may round
  differently from a separate one); elsewhere the layers' own plain norm, whose
  ``weight·sqrt(H)`` is computed once per generation;
* q, k and v are cut apart with ``split``, whose outputs are contiguous copies: a ``slice``
  is a strided view, and every kernel that reads a view (the cache write, the q·k matmul)
  first makes it contiguous in a hidden extra op (~4 µs each on CPU, measured);
* the linears run on the kernel :mod:`.row_gemm` picks (for one row NumPy's BLAS on non-Intel
  CPUs; for a batch the packed copies the serving engine makes), each writing into an output
  tensor kept in the plan;
* kernels are called directly (``_C_ops``, as PaddleNLP's own fused paths do), without the
  Python argument checking of the public wrappers; no PLoRA (generated tokens are text), no
  ``Layer.__call__`` per linear, and the weights are looked up once per generation
  (:class:`DecodePlan`), not in every step.

Only used when it computes exactly what the layers would: plain ``PLoRALinear`` linears
(not wrapped by ``paddlenlp.peft``), no hooks, a rotation matrix (one new token), a cache
that already holds the prompt. Anything else takes the layer-by-layer path.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import paddle
from paddle import _C_ops

from .kernels import norm_weight_for, rms_norm, softmax_last, use_fused_norm
from .kv_cache import KVCache
from .plora import PLoRALinear
from .row_gemm import RowOutput, host_gemm_for, host_weight, row_matmul

__all__ = ["DECODER_LINEARS", "DecodePlan", "can_decode_fast", "decode_layers"]

DECODER_LINEARS = (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w1"), ("feed_forward", "w3"),
            ("feed_forward", "w2"))

# (weight, bias or None, (NumPy view or packed copy of the weight, output) when the rows go to
# row_gemm's host kernel, or None) of a linear; a norm: (weight, eps, weight·sqrt(H) for the plain
# kernel or None); a layer: attention norm, wqkv, wo, ffn norm, w1, w3, w2
_Linear = Tuple[paddle.Tensor, Optional[paddle.Tensor], Optional[Tuple[object, RowOutput]]]
_Norm = Tuple[paddle.Tensor, float, Optional[paddle.Tensor]]
_LayerWeights = Tuple[_Norm, _Linear, _Linear, _Norm, _Linear, _Linear, _Linear]


def _plain(layer: paddle.nn.Layer) -> bool:
    """No hooks anywhere and every linear exactly a ``PLoRALinear`` (e.g. not a peft LoRA wrapper).
    Reads the sublayer dicts directly: ``Layer.__getattr__`` here would cost ~1 ms per token."""
    parts = layer._sub_layers
    linears = [parts[part]._sub_layers[name] for part, name in DECODER_LINEARS]
    modules = [layer, *parts.values(), *linears]
    return (all(type(m) is PLoRALinear for m in linears)
            and not any(m._forward_pre_hooks or m._forward_post_hooks for m in modules))


class DecodePlan:
    """The decoder's weights, head layout, norm epsilons and norm kernel, read once per generation
    (a cache serves one generation; the plain norm's ``weight·sqrt(H)`` is a copy, so a cache kept
    across a weight update would decode with the old norm weights: start a new cache). ``rows``:
    the cache's batch size (a single row may take :mod:`.row_gemm`'s host kernel)."""

    def __init__(self, layers: Sequence[paddle.nn.Layer], final_norm: paddle.nn.Layer, rows: int) -> None:
        attention = layers[0]._sub_layers["attention"]
        self.rows = rows
        self.num_kv_heads, self.head_dim = attention.num_kv_heads, attention.head_dim
        self.groups = attention.num_heads // attention.num_kv_heads
        self.fused_norm = use_fused_norm(final_norm._parameters["weight"])
        self.layers: List[_LayerWeights] = [self._weights(layer) for layer in layers]
        self.final_norm = self._norm(final_norm)

    def _norm(self, layer: paddle.nn.Layer) -> _Norm:
        weight = layer._parameters["weight"]
        plain_weight = None if self.fused_norm or weight.dtype != paddle.float32 else norm_weight_for(weight)
        return weight, layer.eps, plain_weight

    def _weights(self, layer: paddle.nn.Layer) -> _LayerWeights:
        parts = layer._sub_layers

        def linear(part: str, name: str) -> _Linear:
            params = parts[part]._sub_layers[name]._parameters
            weight = params["weight"]
            host = host_gemm_for(self.rows, weight.dtype, weight)  # decode runs without gradients
            # one output tensor per linear, reused every step: each is consumed (copied by the next
            # op: split, add, silu, multiply) before the same linear runs again
            out = (host_weight(weight, self.rows), RowOutput([self.rows, 1], weight.shape[1])) if host else None
            return weight, params.get("bias"), out

        def norm(name: str) -> _Norm:
            return self._norm(parts[name])

        return (norm("attention_norm"), linear("attention", "wqkv"), linear("attention", "wo"), norm("ffn_norm"),
                linear("feed_forward", "w1"), linear("feed_forward", "w3"), linear("feed_forward", "w2"))


def can_decode_fast(layers: Sequence[paddle.nn.Layer], final_norm: paddle.nn.Layer, new_tokens: int,
                    cache: Optional[KVCache], image_rows, rotation: Optional[paddle.Tensor]) -> bool:
    """Whether :func:`decode_layers` computes exactly what the layers would for this forward.
    The layers are checked, and their weights gathered into ``cache.fast_decode`` (a
    :class:`DecodePlan`), once per cache: one generation, during which they do not change."""
    if not (new_tokens == 1 and cache is not None and cache.length > 0 and image_rows is None
            and rotation is not None and not paddle.is_grad_enabled()):
        return False
    if cache.fast_decode is None:
        plain = all(_plain(layer) for layer in layers)
        cache.fast_decode = DecodePlan(layers, final_norm, cache.batch_size) if plain else False
    return bool(cache.fast_decode)


def _linear(x: paddle.Tensor, linear: _Linear) -> paddle.Tensor:
    weight, bias, host = linear
    if host is None or x.dtype != paddle.float32:
        y = _C_ops.matmul(x, weight, False, False)
    else:
        y = row_matmul(x, *host)
    return y if bias is None else _C_ops.add(y, bias)


def decode_layers(plan: Union[DecodePlan, bool, None], x: paddle.Tensor, rotation: paddle.Tensor,
                  mask: Optional[paddle.Tensor], cache: KVCache) -> paddle.Tensor:
    """``x`` ``[b, 1, H]`` embeddings → final-normed hidden ``[b, 1, H]``, writing each layer's
    key/value at position ``cache.length`` (the caller commits). ``plan``: ``cache.fast_decode``
    after :func:`can_decode_fast` said yes. ``rotation`` ``[b|1, 1, 1, d, d]`` (scaled, see
    ``rotary_for``); ``mask`` additive ``[b, nkv, groups, L]``, ``[b, 1, L]`` or ``None``."""
    if not isinstance(plan, DecodePlan):
        raise TypeError("decode_layers needs the DecodePlan can_decode_fast stored in cache.fast_decode")
    b = x.shape[0]
    pos = cache.length
    nkv, hd, groups = plan.num_kv_heads, plan.head_dim, plan.groups
    heads_width = nkv * groups * hd
    if mask is not None and mask.ndim == 3:  # [b, 1, L] (padding): broadcast over heads and groups
        mask = _C_ops.reshape(mask, [mask.shape[0], 1, 1, mask.shape[-1]])
    # one token: the layer works on [b, nkv, heads, d] (query heads, then k, then v per kv head)
    rotation = _C_ops.reshape(rotation, [rotation.shape[0], 1, rotation.shape[-2], rotation.shape[-1]])
    if rotation.dtype != x.dtype:  # once per step, not per layer
        rotation = _C_ops.cast(rotation, x.dtype)
    fused = plan.fused_norm

    def norm(h: paddle.Tensor, weights: _Norm, residual: Optional[paddle.Tensor]):
        return rms_norm(h, weights[0], weights[1], fused, weights[2], residual)

    pending = None  # the previous block's output, not yet added to the residual stream x
    for idx, (att_norm, wqkv, wo, ffn_norm, w1, w3, w2) in enumerate(plan.layers):
        h, x = norm(pending if pending is not None else x, att_norm, x if pending is not None else None)
        qkv = _C_ops.reshape(_linear(h, wqkv), [b, nkv, groups + 2, hd])
        qk, v = _C_ops.split(qkv, [groups + 1, 1], 2)
        q, k = _C_ops.split(_C_ops.matmul(qk, rotation, False, False), [groups, 1], 2)
        keys, values = cache.keys[idx], cache.values[idx]
        _C_ops.set_value_with_tensor_(keys, k, [pos], [pos + 1], [1], [2], [], [])
        _C_ops.set_value_with_tensor_(values, v, [pos], [pos + 1], [1], [2], [], [])
        scores = _C_ops.matmul(q, keys, False, True)  # q, k pre-scaled by the rotation
        if scores.dtype != paddle.float32:
            scores = _C_ops.cast(scores, paddle.float32)
        if mask is not None:
            scores = _C_ops.add_(scores, mask)
        probs = softmax_last(scores)  # the layers' kernel choice (small: Paddle's)
        if probs.dtype != values.dtype:
            probs = _C_ops.cast(probs, values.dtype)
        attended = _C_ops.reshape(_C_ops.matmul(probs, values, False, False), [b, 1, heads_width])
        h, x = norm(_linear(attended, wo), ffn_norm, x)
        gate = _C_ops.silu(_linear(h, w1))
        pending = _linear(_C_ops.multiply(gate, _linear(h, w3)), w2)
    return norm(pending, plan.final_norm, x)[0]
