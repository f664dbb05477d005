"""Partial-LoRA (PLoRA): a LoRA branch applied only to image-token rows.

::

    rows of x:   t t t [i i i ... i] t t t        (t = text token, i = image token)
    y = x W      ───────────────────────          every row
    y += B(A(dropout(x))) * alpha/r  [i ... i]    image rows only (``im_mask``)

Why PLoRA can never be merged into ``W``: the branch applies to some rows and not to
others, so no single matrix ``W'`` reproduces both. It stays a separate branch at
inference; generated tokens are text and never take it.

Which rows are image rows is decided **once per forward** (:class:`ImageRows`), not in
every linear: the official code evaluates ``im_mask.sum() > 0`` in Python in each of the
5 linears of every layer, a host–device synchronisation per call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import paddle
import paddle.nn as nn

from . import row_gemm

__all__ = ["ImageRows", "PLoRALinear", "add_plora_branch"]


@dataclass
class ImageRows:
    """Flat indices (into ``[batch * seq]``) of the rows that take the PLoRA branch."""

    index: paddle.Tensor  # int64 [n_image_rows]

    @classmethod
    def from_mask(cls, im_mask: Optional[paddle.Tensor]) -> Optional["ImageRows"]:
        """``im_mask`` ``[b, t]`` (bool/int) → indices, or ``None`` when no row is an image row."""
        if im_mask is None:
            return None
        index = paddle.nonzero(im_mask.reshape([-1]).astype("bool")).reshape([-1])
        if index.shape[0] == 0:
            return None
        return cls(index=index)


class PLoRALinear(nn.Layer):
    """``y = x W (+ b)``, plus ``B(A(dropout(x))) · lora_alpha/lora_r`` on image rows.

    ``weight`` is stored ``[in, out]`` (Paddle layout). ``Plora_A``/``Plora_B`` are plain
    bias-free linears, named as in the official checkpoint. ``Plora_B`` starts at zero,
    so a freshly built layer equals the base linear.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        lora_r: int = 256,
        lora_alpha: int = 256,
        lora_dropout: float = 0.05,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        bound = 1.0 / math.sqrt(in_features)
        self.weight = self.create_parameter(
            [in_features, out_features], default_initializer=nn.initializer.Uniform(-bound, bound)
        )
        self.bias = (
            self.create_parameter([out_features], is_bias=True, default_initializer=nn.initializer.Uniform(-bound, bound))
            if bias
            else None
        )
        self.lora_scaling = lora_alpha / lora_r
        # not ``lora_dropout``: that name belongs to paddlenlp.peft's LoRA branch (see finetune/lora.py)
        self.plora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.Plora_A = nn.Linear(in_features, lora_r, bias_attr=False)
        self.Plora_B = nn.Linear(
            lora_r, out_features, bias_attr=False, weight_attr=nn.initializer.Constant(0.0)
        )

    def forward(self, x: paddle.Tensor, image_rows: Optional[ImageRows] = None) -> paddle.Tensor:
        y = row_gemm.matmul(x, self.weight)  # a single row may take another kernel (see row_gemm)
        if self.bias is not None:
            y = y + self.bias
        return add_plora_branch(self, x, y, image_rows)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, lora_scaling={self.lora_scaling}"


def add_plora_branch(layer: nn.Layer, x: paddle.Tensor, y: paddle.Tensor, image_rows: Optional[ImageRows]) -> paddle.Tensor:
    """``y`` plus ``layer``'s PLoRA branch on the image rows of ``x`` (``res[im_mask] += ...``)."""
    if image_rows is None:
        return y
    out_features = y.shape[-1]
    part = paddle.gather(x.reshape([-1, x.shape[-1]]), image_rows.index)
    if layer.training:  # even an inactive Dropout copies its input
        part = layer.plora_dropout(part)
    lora = layer.Plora_B(layer.Plora_A(part))
    if layer.lora_scaling != 1.0:
        lora = lora * layer.lora_scaling
    flat_y = y.reshape([-1, out_features])
    if paddle.is_grad_enabled():
        flat_y = paddle.index_add(flat_y, image_rows.index, 0, lora.astype(y.dtype))
    else:  # inference: add in place (8x faster than building a new tensor)
        flat_y.index_add_(image_rows.index, 0, lora.astype(y.dtype))
    return flat_y.reshape(y.shape)
