"""Kernel choice per machine (``kernels.py``): the plain RMSNorm, its agreement with the fused
one, and that a CPU without AVX-512 never reaches the fused kernel."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import kernels
from paddlemix.models.internlm_xcomposer2.internlm2 import RMSNorm


def _reference(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight.astype(np.float64)


@pytest.fixture()
def no_avx512(monkeypatch):
    """This process behaves as on a CPU without AVX-512, and the fused kernel must not run."""
    monkeypatch.setattr(kernels, "cpu_has_avx512", lambda: False)

    def refuse(*args, **kwargs):
        raise AssertionError("fused_rms_norm_quant called on a CPU without AVX-512")

    monkeypatch.setattr(kernels._C_ops, "fused_rms_norm_quant", refuse)


@pytest.mark.parametrize("shape", [[1, 1, 1024], [2, 7, 64], [5, 48]])
def test_plain_rms_norm_matches_the_formula(shape):
    rng = np.random.default_rng(0)
    x, w, r = (rng.standard_normal(s).astype(np.float32) * 3 for s in (shape, shape[-1:], shape))
    with paddle.no_grad():
        out, total = kernels.rms_norm(paddle.to_tensor(x), paddle.to_tensor(w), 1e-5, fused=False,
                                      residual=paddle.to_tensor(r))
        alone, same = kernels.rms_norm(paddle.to_tensor(x), paddle.to_tensor(w), 1e-5, fused=False)
    np.testing.assert_array_equal(total.numpy(), x + r)
    np.testing.assert_allclose(out.numpy(), _reference(x + r, w, 1e-5), atol=1e-5, rtol=0)
    np.testing.assert_allclose(alone.numpy(), _reference(x, w, 1e-5), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(same.numpy(), x)


def test_plain_rms_norm_in_bfloat16_follows_the_official_order():
    """Normalised in float32, cast, then multiplied by the weight (as the official RMSNorm and
    our training path): equal to the training path's result bit for bit."""
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal([3, 64]).astype(np.float32)).astype("bfloat16")
    norm = RMSNorm(64, 1e-5)
    norm.weight.set_value(paddle.to_tensor(rng.uniform(0.5, 1.5, [64]).astype(np.float32)))
    norm.to(dtype="bfloat16")
    with paddle.no_grad():
        plain = kernels.plain_rms_norm(x, norm.weight, 1e-5)
    trained = norm(x)  # gradients enabled: the textbook formula
    assert plain.dtype == paddle.bfloat16
    # bit for bit: multiplying by the weight before the cast would differ in a quarter of the entries
    np.testing.assert_array_equal(plain.astype("float32").numpy(), trained.astype("float32").numpy())


def test_plain_and_fused_agree_or_fused_is_refused():
    """Where the CPU has AVX-512, the two kernels agree; where it has not, forcing the fused one
    is refused (it would kill the process) and the decision says plain."""
    rng = np.random.default_rng(2)
    x, w, r = (paddle.to_tensor(rng.standard_normal(s).astype(np.float32)) for s in ([4, 3, 256], [256], [4, 3, 256]))
    if not kernels.cpu_has_avx512():
        with pytest.raises(ValueError, match="no AVX-512"):
            kernels.set_fused_kernels_on_cpu(True)
        assert not kernels.use_fused_norm(x)
        return
    with paddle.no_grad():
        fused, fused_total = kernels.rms_norm(x, w, 1e-5, fused=True, residual=r)
        plain, plain_total = kernels.rms_norm(x, w, 1e-5, fused=False, residual=r)
    np.testing.assert_allclose(plain.numpy(), fused.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(plain_total.numpy(), fused_total.numpy(), atol=1e-6, rtol=0)


def test_the_cpu_decision_is_made_once_and_can_be_forced():
    kernels.cpu_has_avx512()
    before = kernels.cpu_has_avx512.cache_info()
    x = paddle.ones([1, 4])
    for _ in range(3):
        kernels.use_fused_norm(x)
    assert kernels.cpu_has_avx512.cache_info().misses == before.misses  # cached, not asked again
    try:
        kernels.set_fused_kernels_on_cpu(False)
        assert not kernels.use_fused_norm(x)
    finally:
        kernels.set_fused_kernels_on_cpu(None)
    assert kernels.use_fused_norm(x) == kernels.cpu_has_avx512()


def test_chat_on_a_cpu_without_avx512_never_calls_the_fused_kernel(no_avx512, tiny_model, tiny_dir, golden,
                                                                    golden_json):
    """The whole greedy chat (prefill, fused decode path, final norm) as it runs on an AVX2-only
    CPU: the fused kernel is never reached and the ids are the official ones."""
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer

    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    ids, _ = tiny_model.generate_ids(tokenizer, golden_json["chat"]["query"], image=str(tiny_dir / "img1.png"),
                                     do_sample=False, max_new_tokens=16)
    assert ids == golden["gen_output_ids"].tolist()
