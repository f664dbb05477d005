"""An explicit key/value cache passed through the decoder.

One buffer pair per layer, ``[batch, num_kv_heads, capacity, head_dim]``, with capacity
grown in blocks of ``BLOCK`` positions. A forward writes its new keys/values at
``[length, length + t)``; attention then reads the *whole* buffer (contiguous — a slice
``[:, :, :length]`` is strided, and every matmul on it would copy it first) and the
causal mask hides the positions not written yet.

A cache serves one generation, so it also carries what decode steps reuse from one token
to the next instead of rebuilding it every time: the fused-path decision and weights
(``fast_decode``), the additive mask (``step_mask``) and a block of rotation matrices
(``rotations``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import paddle

__all__ = ["KVCache", "BLOCK"]

BLOCK = 128  # capacity granularity: at most BLOCK-1 unused positions are attended (masked)


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class KVCache:
    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 capacity: int = BLOCK, dtype: str = "float32") -> None:
        self.num_layers, self.batch_size = num_layers, batch_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.capacity = _round_up(max(capacity, 1))
        # allocated at the first write of each layer (by concatenation: a strided write of a
        # whole prompt into a zero buffer costs ~8x more)
        self.keys: List[Optional[paddle.Tensor]] = [None] * num_layers
        self.values: List[Optional[paddle.Tensor]] = [None] * num_layers
        self.length = 0  # positions committed by completed forwards
        # whether decode steps may take fast_decode.decode_layers: a DecodePlan (yes) or False,
        # decided at the first one (a cache serves one generation, during which the model's
        # layers do not change)
        self.fast_decode: Optional[object] = None
        # (additive mask, last open position, capacity, batch) of the latest one-token step
        # (internlm2.step_mask)
        self.step_mask: Optional[Tuple[paddle.Tensor, int, int, int]] = None
        # rotation matrices of the coming decode positions (rope.RotationTable)
        self.rotations: Optional[object] = None

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more positions (growing by whole blocks)."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        grow = _round_up(needed) - self.capacity
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    store[i] = paddle.concat([buf, self._zeros(grow)], axis=2)
        self.capacity += grow

    def _zeros(self, positions: int, rows: Optional[int] = None) -> paddle.Tensor:
        rows = self.batch_size if rows is None else rows
        return paddle.zeros([rows, self.num_kv_heads, positions, self.head_dim], dtype=self.dtype)

    @classmethod
    def stack_left_padded(cls, caches: Sequence["KVCache"]) -> "KVCache":
        """One cache whose row ``i`` holds the single-row cache ``caches[i]`` (every layer written),
        each moved right so that all end at the longest one's length: row ``i`` is left-padded by
        ``longest - caches[i].length`` zero positions, which an attention mask must hide (the
        layout of a left-padded batch prefill). One free position is kept for the next token. The
        source caches are consumed: each layer's buffers are released once stacked, so the peak
        is the stacked cache plus one layer of the sources, not twice the whole cache."""
        if not caches or any(c.batch_size != 1 or any(k is None for k in c.keys) for c in caches):
            raise ValueError("stack_left_padded takes single-row caches whose every layer holds the prompt")
        first = caches[0]
        longest = max(c.length for c in caches)
        out = cls(first.num_layers, len(caches), first.num_kv_heads, first.head_dim, longest + 1, first.dtype)
        for source, target in (("keys", out.keys), ("values", out.values)):
            for layer in range(out.num_layers):
                rows = []
                for cache in caches:
                    written = getattr(cache, source)[layer][:, :, : cache.length]
                    parts = [out._zeros(longest - cache.length, 1)] if cache.length < longest else []
                    rows.append(paddle.concat(parts + [written, out._zeros(out.capacity - longest, 1)], axis=2))
                    getattr(cache, source)[layer] = None
                target[layer] = paddle.concat(rows, axis=0)
        out.length = longest
        return out

    def update(self, layer: int, key: paddle.Tensor, value: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Store ``key``/``value`` ``[b, nkv, t, hd]`` after the committed prefix; return what
        attention must read: the layer's whole buffers ``[b, nkv, capacity, hd]`` (unwritten
        positions are zeros the causal mask hides), or, for the first forward (nothing
        cached before), just ``key``/``value`` themselves (see ``key_length``)."""
        t = key.shape[2]
        if self.keys[layer] is None:
            tail = self.capacity - self.length - t
            head = [self._zeros(self.length)] if self.length else []
            self.keys[layer] = paddle.concat(head + [key.astype(self.dtype), self._zeros(tail)], axis=2)
            self.values[layer] = paddle.concat(head + [value.astype(self.dtype), self._zeros(tail)], axis=2)
            if not self.length:
                return key, value
        elif paddle.is_grad_enabled():
            # out of place: an earlier step's attention kept the old buffers for its backward,
            # and an in-place write would invalidate them
            self.keys[layer] = self._written(self.keys[layer], key.astype(self.dtype))
            self.values[layer] = self._written(self.values[layer], value.astype(self.dtype))
        else:
            self.keys[layer][:, :, self.length : self.length + t] = key
            self.values[layer][:, :, self.length : self.length + t] = value
        return self.keys[layer], self.values[layer]

    def _written(self, buffer: paddle.Tensor, new: paddle.Tensor) -> paddle.Tensor:
        """A copy of ``buffer`` with ``new`` at ``[length, length + t)``."""
        end = self.length + new.shape[2]
        return paddle.concat([buffer[:, :, : self.length], new, buffer[:, :, end:]], axis=2)

    def key_length(self, new_tokens: int) -> int:
        """How many keys attention sees in the coming forward of ``new_tokens`` tokens: the new
        ones only on the first forward (no padding columns in a long prefill), else the
        whole buffer."""
        return new_tokens if self.length == 0 else self.capacity

    def commit(self, new_tokens: int) -> None:
        """Called once per forward, after every layer wrote ``new_tokens`` positions."""
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Forget the positions after ``length`` (one prefix reused for several continuations):
        later writes overwrite them and the causal mask hides them until then."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
        self.step_mask = None

    def select_rows(self, rows: paddle.Tensor) -> None:
        """Keep only batch rows ``rows`` (e.g. to drop finished sequences)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                if buf is not None:
                    store[i] = paddle.gather(buf, rows, axis=0)
        if int(rows.shape[0]) != self.batch_size:
            self.fast_decode = None  # its per-linear outputs are sized for the old row count
        self.batch_size = int(rows.shape[0])
        self.step_mask = None
