"""CLIP vision tower (HF ``CLIPVisionModel`` layout and parameter names) and the projector.

Parameter names follow the official checkpoint: ``vit.vision_tower.vision_model.*``
(``embeddings.patch_embedding``, ``pre_layrnorm`` (sic), ``encoder.layers.{j}...``,
``post_layernorm``). The model uses the *last encoder layer* with the CLS row dropped
and no post-LayerNorm; ``post_layernorm`` is kept only so official checkpoints
round-trip.
"""
from __future__ import annotations

import math
from typing import List

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from .configuration import VisionConfig
from .kernels import softmax_last

__all__ = ["CLIPVisionTower", "build_vision_projector", "resize_position_table"]


def quick_gelu(x: paddle.Tensor) -> paddle.Tensor:
    return x * F.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def resize_position_table(table: paddle.Tensor, new_grid: int) -> paddle.Tensor:
    """Bicubically resize a CLIP position table ``[1 + g*g, D]`` to ``[1 + new_grid**2, D]``.

    The CLS row is kept as is; the grid rows are resized like the official
    ``resize_pos`` (``F.interpolate(..., mode="bicubic", align_corners=False)``).
    """
    rows, dim = table.shape
    old_grid = math.isqrt(rows - 1)
    if old_grid * old_grid != rows - 1:
        raise ValueError(f"position table with {rows} rows is not 1 + a square grid")
    if old_grid == new_grid:
        return table
    cls_row, grid = table[:1], table[1:]
    grid = grid.reshape([1, old_grid, old_grid, dim]).transpose([0, 3, 1, 2])
    grid = F.interpolate(grid.astype("float32"), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.transpose([0, 2, 3, 1]).reshape([new_grid * new_grid, dim]).astype(table.dtype)
    return paddle.concat([cls_row, grid], axis=0)


class CLIPVisionEmbeddings(nn.Layer):
    def __init__(self, cfg: VisionConfig, grid: int) -> None:
        super().__init__()
        self.class_embedding = self.create_parameter([cfg.hidden_size], default_initializer=nn.initializer.Normal())
        self.patch_embedding = nn.Conv2D(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias_attr=False
        )
        self.position_embedding = nn.Embedding(grid * grid + 1, cfg.hidden_size)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """``[n, C, S, S]`` → ``[n, 1 + (S/patch)**2, D]`` (CLS first)."""
        patches = self.patch_embedding(pixel_values.astype(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose([0, 2, 1])
        n, dim = patches.shape[0], patches.shape[2]
        cls = self.class_embedding.reshape([1, 1, dim]).expand([n, 1, dim])
        return paddle.concat([cls, patches], axis=1) + self.position_embedding.weight.unsqueeze(0)


class CLIPAttention(nn.Layer):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        n, t, d = x.shape
        shape = [n, t, self.num_heads, self.head_dim]
        q = (self.q_proj(x) * self.scale).reshape(shape).transpose([0, 2, 1, 3])
        k = self.k_proj(x).reshape(shape).transpose([0, 2, 1, 3])
        v = self.v_proj(x).reshape(shape).transpose([0, 2, 1, 3])
        probs = softmax_last(paddle.matmul(q, k, transpose_y=True).astype("float32")).astype(v.dtype)
        out = paddle.matmul(probs, v).transpose([0, 2, 1, 3]).reshape([n, t, d])
        return self.out_proj(out)


class CLIPMLP(nn.Layer):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Layer):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Layer):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.LayerList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionTransformer(nn.Layer):
    def __init__(self, cfg: VisionConfig, grid: int) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg, grid)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """Last encoder layer output ``[n, 1 + P, D]``: no post-LayerNorm (the official
        model reads ``hidden_states[-1]``, which is taken before it)."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x)
        return x


class CLIPVisionModel(nn.Layer):
    def __init__(self, cfg: VisionConfig, grid: int) -> None:
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg, grid)


class CLIPVisionTower(nn.Layer):
    """``vit`` of the official model: patch features of the last layer, CLS dropped."""

    def __init__(self, cfg: VisionConfig, grid: int) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(cfg, grid)

    def forward(self, pixel_values: paddle.Tensor) -> paddle.Tensor:
        """``[n, C, S, S]`` → ``[n, (S/patch)**2, D]``."""
        return self.vision_tower.vision_model(pixel_values)[:, 1:]

    def resize_pos(self) -> None:
        """Official name (the composition demo calls it): the position table is already loaded at
        the grid of ``img_size`` (checkpoints store it resized), so there is nothing to do."""


def build_vision_projector(in_dim: int, hidden: int, depth: int) -> nn.Sequential:
    """``vision_proj``: Linear(in, H), then ``depth-1`` × (exact GELU, Linear(H, H)).

    Names come out as ``vision_proj.0``, ``vision_proj.2``, ... as in the checkpoint.
    """
    layers: List[nn.Layer] = [nn.Linear(in_dim, hidden)]
    for _ in range(depth - 1):
        layers += [nn.GELU(approximate=False), nn.Linear(hidden, hidden)]
    return nn.Sequential(*layers)
