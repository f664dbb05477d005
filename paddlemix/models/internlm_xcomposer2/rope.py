"""Rotary position embedding (rotate-half, InternLM2) with dynamic NTK scaling.

Computed once per forward for all layers; applied to the query heads and the key head of
each kv group together (they are adjacent in the packed Wqkv output). For a single new
token the rotation is one ``[d, d]`` matrix per row, so decoding rotates with one matmul
instead of the seven elementwise ops of rotate-half.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import paddle
from paddle import _C_ops

__all__ = ["rope_base", "rope_inv_freq", "rotary_cos_sin", "apply_rotary", "Rotary", "RotationTable", "rotary_for"]


def rope_base(config, seq_len: int) -> float:
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


def positions_sharing_base(config, position: int, limit: int) -> int:
    """How many positions from ``position`` on (at most ``limit``) decode with the same base as
    ``position``: up to ``max_position_embeddings`` under dynamic NTK, then one (the base grows
    with every token)."""
    scaling = config.rope_scaling or {}
    if scaling.get("type") != "dynamic":
        return limit
    return max(1, min(limit, config.max_position_embeddings - position))


def rope_inv_freq(head_dim: int, base: float) -> paddle.Tensor:
    """``1 / base^(arange(0, d, 2)/d)`` in float32, ``[d/2]`` (computed once per base and device:
    decoding asks for it every token)."""
    return _inv_freq(head_dim, base, paddle.get_device())


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, base: float, device: str) -> paddle.Tensor:
    exponents = paddle.arange(0, head_dim, 2, dtype="float32") / head_dim
    return 1.0 / (paddle.full([], base, dtype="float32") ** exponents)


def rotary_cos_sin(positions: paddle.Tensor, inv_freq: paddle.Tensor):
    """``positions`` float32 ``[..., t]`` → ``cos, sin`` ``[..., t, d]`` (``emb = cat(f, f)``)."""
    freqs = positions.unsqueeze(-1) * inv_freq
    emb = paddle.concat([freqs, freqs], axis=-1)
    return paddle.cos(emb), paddle.sin(emb)


def apply_rotary(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """Rotate-half RoPE: ``x * cos + rotate_half(x) * sin``; ``cos``/``sin`` broadcast to ``x``
    (their last axis is ``d``)."""
    first, second = paddle.split(x, 2, axis=-1)  # not slices: see InternLM2Attention.forward
    rotated = paddle.concat([-second, first], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


@functools.lru_cache(maxsize=8)
def _rotate_half_matrix(d: int) -> np.ndarray:
    """``M`` with ``x @ M == concat(-x[d/2:], x[:d/2])``."""
    half = d // 2
    m = np.zeros((d, d), dtype=np.float32)
    m[np.arange(half) + half, np.arange(half)] = -1.0
    m[np.arange(half), np.arange(half) + half] = 1.0
    return m


@functools.lru_cache(maxsize=8)
def _rotation_bases(d: int, device: str):
    """``I`` and ``M`` (rotate-half) as float32 tensors."""
    return paddle.eye(d, dtype="float32"), paddle.to_tensor(_rotate_half_matrix(d))


def _rotation_matrix(cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
    """``R`` with ``x @ R == apply_rotary(x, cos, sin)`` for one position: ``cos``/``sin``
    ``[..., d]`` → ``[..., d, d]``: ``R = diag(cos) + M·diag(sin)``, ``M`` = rotate-half."""
    eye, rotate_half = _rotation_bases(cos.shape[-1], paddle.get_device())
    return eye * cos.unsqueeze(-2) + rotate_half * sin.unsqueeze(-2)


@functools.lru_cache(maxsize=64)
def _host_inv_freq(head_dim: int, base: float) -> np.ndarray:
    return rope_inv_freq(head_dim, base).numpy()


def _host_rotations(head_dim: int, base: float, positions: np.ndarray, scale: float) -> np.ndarray:
    """:func:`_rotation_matrix` of each position, ``[n, d, d]`` float32, on the host with the same
    float32 steps, instead of ~12 small device ops per decoded token. cos/sin are computed in
    float64 and rounded (Paddle's vectorised float32 kernels can differ by 1 ulp, far inside the
    golden tolerance; prefill and decode each use one rule consistently)."""
    freqs = positions.astype(np.float32)[:, None] * _host_inv_freq(head_dim, base)[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    if scale != 1.0:
        cos, sin = cos * np.float32(scale), sin * np.float32(scale)
    eye, rotate_half = np.eye(head_dim, dtype=np.float32), _rotate_half_matrix(head_dim)
    return eye[None] * cos[:, None, :] + rotate_half[None] * sin[:, None, :]


ROTATION_BLOCK = 16  # decode positions whose rotations are built on the host and sent together


@dataclass
class RotationTable:
    """Rotation matrices ``[n, 1, 1, d, d]`` of positions ``start .. start+n-1`` for one
    base and scale: a decode step takes its matrix as a view instead of building and
    sending one (a host computation and a transfer per token)."""

    base: float
    scale: float
    start: int
    matrices: paddle.Tensor

    def covers(self, base: float, scale: float, position: int) -> bool:
        return (base == self.base and scale == self.scale
                and self.start <= position < self.start + self.matrices.shape[0])

    def at(self, position: int) -> paddle.Tensor:
        """``[1, 1, 1, d, d]``: a contiguous view of the table (no copy)."""
        offset = position - self.start
        return _C_ops.slice(self.matrices, [0], [offset], [offset + 1], [1], [])

    @classmethod
    def build(cls, head_dim: int, base: float, scale: float, start: int, count: int) -> "RotationTable":
        matrices = _host_rotations(head_dim, base, np.arange(start, start + count), scale)
        return cls(base, scale, start, paddle.to_tensor(matrices.reshape([count, 1, 1, head_dim, head_dim])))


@dataclass
class Rotary:
    """The rotation of one forward: elementwise tables ``cos``/``sin`` ``[b|1, t, 1, 1, d]``
    (prefill, training), or one matrix per row ``[b|1, 1, 1, d, d]`` (a single new token)."""

    cos: Optional[paddle.Tensor] = None
    sin: Optional[paddle.Tensor] = None
    matrix: Optional[paddle.Tensor] = None

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        """Rotate ``x`` ``[b, t, nkv, heads, d]``."""
        if self.matrix is not None:
            return paddle.matmul(x, self.matrix if self.matrix.dtype == x.dtype else self.matrix.astype(x.dtype))
        return apply_rotary(x.contiguous(), self.cos, self.sin)  # strided inputs are ~3x slower

    def expanded(self, shape, limit: int) -> "Rotary":
        """The tables broadcast to ``shape`` once per forward (for same-shape elementwise ops in
        every layer: Paddle's CPU broadcasting is several times slower), unless larger than
        ``limit`` elements."""
        if self.cos is None or int(np.prod(shape)) > limit:
            return self
        return Rotary(cos=self.cos.expand(shape), sin=self.sin.expand(shape))


def rotary_for(config, past: int, new_tokens: int, position_ids: Optional[paddle.Tensor],
               scale: float = 1.0, holder: Any = None) -> Rotary:
    """The rotation for positions ``past .. past+t-1`` (or ``position_ids`` ``[b, t]``); the
    base depends on the total length ``past + t`` (dynamic NTK). ``scale`` multiplies the
    rotated vectors (a free way to fold a constant factor into q and k). ``holder``: an object
    with a ``rotations`` attribute (the KV cache) that keeps the :class:`RotationTable` of
    the coming decode steps."""
    base = rope_base(config, past + new_tokens)
    if new_tokens == 1 and position_ids is None:  # a decode step: host-built matrices, sent a block at a time
        table = getattr(holder, "rotations", None)
        if table is None or not table.covers(base, scale, past):
            count = positions_sharing_base(config, past, ROTATION_BLOCK) if holder is not None else 1
            table = RotationTable.build(config.head_dim, base, scale, past, count)
            if holder is not None:
                holder.rotations = table
        return Rotary(matrix=table.at(past))
    inv_freq = rope_inv_freq(config.head_dim, base)
    if position_ids is None:
        positions = paddle.arange(past, past + new_tokens, dtype="float32").unsqueeze(0)
    else:
        positions = position_ids.astype("float32")
    cos, sin = rotary_cos_sin(positions, inv_freq)  # [b|1, t, d]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    if new_tokens == 1:
        return Rotary(matrix=_rotation_matrix(cos, sin).reshape([cos.shape[0], 1, 1, cos.shape[-1], cos.shape[-1]]))
    return Rotary(cos=cos.unsqueeze([2, 3]), sin=sin.unsqueeze([2, 3]))
