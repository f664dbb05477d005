"""Partial-LoRA: zero-init B, all-false mask = base output, only image rows change."""
from __future__ import annotations

import numpy as np
import paddle

from paddlemix.models.internlm_xcomposer2.plora import ImageRows, PLoRALinear


def _layer(seed: int = 0) -> PLoRALinear:
    paddle.seed(seed)
    layer = PLoRALinear(8, 6, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    layer.Plora_B.weight.set_value(paddle.randn([4, 6]))
    return layer


def test_fresh_plora_b_is_zero_and_a_no_op():
    paddle.seed(1)
    layer = PLoRALinear(8, 6, lora_r=4, lora_alpha=8)
    assert not layer.Plora_B.weight.numpy().any()
    x = paddle.randn([2, 5, 8])
    rows = ImageRows.from_mask(paddle.ones([2, 5], dtype="bool"))
    np.testing.assert_array_equal(layer(x, rows).numpy(), layer(x).numpy())


def test_all_false_mask_is_exactly_the_base_linear():
    layer = _layer()
    x = paddle.randn([2, 5, 8])
    assert ImageRows.from_mask(paddle.zeros([2, 5], dtype="bool")) is None
    base = paddle.matmul(x, layer.weight).numpy()
    np.testing.assert_array_equal(layer(x, ImageRows.from_mask(paddle.zeros([2, 5], dtype="bool"))).numpy(), base)


def test_only_image_rows_change_by_the_scaled_branch():
    layer = _layer()
    x = paddle.randn([2, 5, 8])
    mask = paddle.to_tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype="bool")
    y = layer(x, ImageRows.from_mask(mask)).numpy()
    base = paddle.matmul(x, layer.weight).numpy()
    lora = (x.numpy() @ layer.Plora_A.weight.numpy() @ layer.Plora_B.weight.numpy()) * (8 / 4)
    m = mask.numpy()
    np.testing.assert_array_equal(y[~m], base[~m])
    np.testing.assert_allclose(y[m], base[m] + lora[m], atol=1e-5)
    assert np.abs(y[m] - base[m]).min() > 0


def test_gradients_reach_plora_only_through_image_rows():
    layer = _layer()
    x = paddle.randn([1, 4, 8])
    text_only = layer(x, None).sum()
    text_only.backward()
    assert layer.Plora_A.weight.grad is None or not layer.Plora_A.weight.grad.numpy().any()
    layer.clear_gradients()
    layer(x, ImageRows.from_mask(paddle.to_tensor([[0, 1, 0, 0]], dtype="bool"))).sum().backward()
    assert layer.Plora_A.weight.grad.numpy().any() and layer.Plora_B.weight.grad.numpy().any()
