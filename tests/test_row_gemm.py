"""The single-row GEMM kernel choice (row_gemm.py): who takes it, that it copies no weights, and
that it computes the same product as Paddle's matmul."""
import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import row_gemm
from paddlemix.models.internlm_xcomposer2.row_gemm import (RowOutput, choose_row_gemm, row_matmul, set_row_gemm,
                                                           takes_host_gemm, weight_view)


def test_the_choice_follows_the_cpu_vendor_unless_the_environment_names_one():
    assert choose_row_gemm("GenuineIntel") == "paddle"
    assert choose_row_gemm("") == "paddle"  # unknown (no /proc/cpuinfo): leave Paddle's kernel
    assert choose_row_gemm("AuthenticAMD") == "numpy"
    assert choose_row_gemm("HygonGenuine") == "numpy"
    assert choose_row_gemm("AuthenticAMD", "paddle") == "paddle"
    assert choose_row_gemm("GenuineIntel", "numpy") == "numpy"
    with pytest.raises(ValueError, match="IXC2_ROW_GEMM='mkl'"):
        choose_row_gemm("AuthenticAMD", "mkl")
    with pytest.raises(ValueError, match="expected one of paddle, numpy"):
        set_row_gemm("openblas")


def test_only_a_single_float32_row_without_a_graph_goes_to_numpy(row_gemms):
    weight = paddle.randn([16, 24])
    weight.stop_gradient = False
    one = paddle.randn([1, 1, 16])
    with paddle.no_grad():
        assert takes_host_gemm(one, weight) == (row_gemms == "numpy")
        assert not takes_host_gemm(paddle.randn([2, 1, 16]), weight)  # a batch: Paddle's (faster there)
        assert not takes_host_gemm(one.astype("bfloat16"), weight.astype("bfloat16"))
    assert not takes_host_gemm(one, weight), "a trainable weight with gradients on keeps autograd's kernel"
    frozen = paddle.randn([16, 24])  # stop_gradient by default, as is `one`
    assert takes_host_gemm(one, frozen) == (row_gemms == "numpy")


def test_weights_that_fit_in_the_caches_stay_on_paddles_kernel():
    try:
        set_row_gemm("numpy")  # default size limit
        with paddle.no_grad():
            one = paddle.randn([1, 1, 256])
            assert not takes_host_gemm(one, paddle.randn([256, 256]))  # 256 KiB
            assert takes_host_gemm(one, paddle.randn([256, 1024]))  # 1 MiB
    finally:
        set_row_gemm(None)


def test_the_weight_is_read_in_place_and_the_product_is_paddles(row_gemms):
    paddle.seed(0)
    weight, x = paddle.randn([64, 96]), paddle.randn([1, 1, 64])
    view = weight_view(weight)
    assert view.ctypes.data == weight.data_ptr() and not view.flags.writeable  # no copy of the weight
    out = RowOutput([1, 1], 96)
    y = row_matmul(x, view, out)
    assert y is out.tensor and y.shape == [1, 1, 96] and y.dtype == paddle.float32
    np.testing.assert_array_equal(y.numpy().reshape(1, 96), x.numpy().reshape(1, 64) @ view)
    np.testing.assert_allclose(y.numpy(), paddle.matmul(x, weight).numpy(), atol=1e-5, rtol=0)
    again = row_matmul(x * 2, view, out)  # the reused output is overwritten
    np.testing.assert_allclose(again.numpy(), paddle.matmul(x * 2, weight).numpy(),
                               atol=1e-5, rtol=0)
    with paddle.no_grad():
        np.testing.assert_allclose(row_gemm.matmul(x, weight).numpy(), paddle.matmul(x, weight).numpy(),
                                   atol=1e-5, rtol=0)


def test_a_decode_step_of_the_model_takes_the_chosen_kernel(tiny_model, row_gemms, monkeypatch):
    """The head and every decoder linear of a one-row decode step go through row_matmul exactly
    when NumPy's kernel is chosen; of the prompt (many rows) only the head's last row does."""
    from paddlemix.models.internlm_xcomposer2 import fast_decode, modeling
    from paddlemix.models.internlm_xcomposer2.kv_cache import KVCache

    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return row_matmul(*args)

    monkeypatch.setattr(fast_decode, "row_matmul", counting)
    monkeypatch.setattr(modeling, "row_matmul", counting)
    cfg = tiny_model.config
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, 16, paddle.float32)
    with paddle.no_grad():
        tiny_model(input_ids=paddle.to_tensor([[1, 2, 3, 4]]), past_key_values=cache, logits_to_keep=1)
        assert calls == ([[1, 1, cfg.hidden_size]] if row_gemms == "numpy" else [])
        tiny_model(input_ids=paddle.to_tensor([[5]]), past_key_values=cache, logits_to_keep=1)
    assert len(calls) == ((1 + 5 * cfg.num_hidden_layers + 1) if row_gemms == "numpy" else 0)
