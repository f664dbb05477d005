"""An explicit, preallocated key/value cache passed through the decoder.

One buffer pair per layer, ``[batch, num_kv_heads, capacity, head_dim]``; a forward
writes its new keys/values at ``[length, length + t)`` and reads ``[0, length + t)``.
No per-step concatenation: decoding a token costs one slice write per layer.
"""
from __future__ import annotations

from typing import List, Tuple

import paddle

__all__ = ["KVCache"]


class KVCache:
    def __init__(
        self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, dtype: str = "float32"
    ) -> None:
        shape = [batch_size, num_kv_heads, capacity, head_dim]
        self.keys: List[paddle.Tensor] = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values: List[paddle.Tensor] = [paddle.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.length = 0  # tokens committed by completed forwards

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` more positions, growing (doubling) if needed."""
        needed = self.length + new_tokens
        if needed <= self.capacity:
            return
        grow = max(needed, 2 * self.capacity) - self.capacity
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                pad = paddle.zeros([buf.shape[0], buf.shape[1], grow, buf.shape[3]], dtype=buf.dtype)
                store[i] = paddle.concat([buf, pad], axis=2)

    def update(self, layer: int, key: paddle.Tensor, value: paddle.Tensor) -> Tuple[paddle.Tensor, paddle.Tensor]:
        """Store ``key``/``value`` ``[b, nkv, t, hd]`` after the committed prefix and return
        the layer's keys/values so far ``[b, nkv, length + t, hd]``."""
        end = self.length + key.shape[2]
        self.keys[layer][:, :, self.length : end] = key
        self.values[layer][:, :, self.length : end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def commit(self, new_tokens: int) -> None:
        """Called once per forward, after every layer wrote ``new_tokens`` positions."""
        self.length += new_tokens

    def select_rows(self, rows: paddle.Tensor) -> None:
        """Keep only batch rows ``rows`` (e.g. to drop finished sequences)."""
        for store in (self.keys, self.values):
            for i, buf in enumerate(store):
                store[i] = paddle.gather(buf, rows, axis=0)
