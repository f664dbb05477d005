"""Which fused kernels this machine may run, decided once per process, and RMSNorm on either path.

Paddle 3.3.1's CPU ``fused_rms_norm`` (``_C_ops.fused_rms_norm_quant``) runs
``phi::fusion::RmsNormAvxKernel``: AVX-512 code that never checks the CPU, so on a CPU
without AVX-512 (AMD before Zen 4, most Intel desktop and laptop parts) the process dies
with ``SIGILL``. Every other kernel this package calls either has plain x86-64/AVX2 code or
chooses its code path from the CPU at run time (MKL, oneDNN, Paddle's jit kernels).

Audit of the Paddle 3.3.1 CPU kernels the package calls (``objdump -d`` of
``libphi_core.so``: functions holding AVX-512 ``zmm``/opmask instructions; re-run with
``scripts/avx512_audit.py``):

==============================================  ============================  ==================
kernel (where)                                  CPU code                      needs AVX-512
==============================================  ============================  ==================
``fused_rms_norm_quant`` (RMSNorm, decode)      ``RmsNormAvxKernel``          **yes, unchecked**
``norm`` (the plain RMSNorm below)              Eigen                         no
``matmul`` (linears, attention)                 MKL / oneDNN, CPU dispatch    no
``softmax``, ``silu``, ``exp``                  Paddle jit, CPU dispatch      no
``add``, ``multiply``, ``scale``, ``rsqrt``,    Eigen / plain loops           no
``mean``, ``cast``, ``split``, ``reshape``,
``set_value_with_tensor_``, ``slice``, ``concat``,
``cross_entropy``, ``conv2d`` (ViT), ``gelu``,
``layer_norm`` (ViT)
==============================================  ============================  ==================

Other fused CPU kernels in the wheel that hold AVX-512 code and are *not* used here:
``fused_bias_residual_layernorm``, ``fusion_squared_mat_sub`` and the CPU flash-attention
helpers of ``self_dp_attention`` (11 functions in all, none in ``libpaddle.so``). On a GPU the
fused kernels are always used. ``tests/test_portability.py`` runs the chat and a training step
on an emulated AVX2-only CPU, where any AVX-512 instruction kills the process.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional, Tuple

import paddle
from paddle import _C_ops

from . import onednn

logger = logging.getLogger(__name__)

__all__ = ["cpu_has_avx512", "fused_kernels_on_cpu", "set_fused_kernels_on_cpu", "use_fused_norm",
           "rms_norm", "norm_weight_for", "plain_rms_norm", "SOFTMAX_MIN_ELEMENTS", "softmax_last"]

SOFTMAX_MIN_ELEMENTS = 1 << 16  # below, Paddle's softmax is as fast (16×470 decode scores: 17 µs vs 35)

_forced: Optional[bool] = None  # set_fused_kernels_on_cpu(); None: decided from the CPU


@functools.lru_cache(maxsize=1)
def cpu_has_avx512() -> bool:
    """Whether this CPU runs the AVX-512 (F) instructions of Paddle's fused CPU kernels.

    Paddle's own ``cpuid`` check (it also asks the OS whether it saves the ``zmm`` state).
    Read once per process and logged once."""
    supported = bool(paddle.base.core.supports_avx512f())
    if supported:
        logger.debug("the CPU has AVX-512: Paddle's fused CPU kernels are used")
    else:
        logger.info("the CPU has no AVX-512: plain kernels instead of Paddle's fused CPU ones (which need it)")
    return supported


def set_fused_kernels_on_cpu(enabled: Optional[bool]) -> None:
    """Force (``True``/``False``) or restore (``None``: decided from the CPU) the choice of
    fused CPU kernels for this process. ``True`` on a CPU without AVX-512 is refused."""
    global _forced
    if enabled and not cpu_has_avx512():
        raise ValueError("this CPU has no AVX-512: Paddle's fused CPU kernels would crash it (SIGILL)")
    _forced = enabled


def fused_kernels_on_cpu() -> bool:
    """Whether fused CPU kernels are used in this process (see :func:`set_fused_kernels_on_cpu`)."""
    return cpu_has_avx512() if _forced is None else _forced


def use_fused_norm(x: paddle.Tensor) -> bool:
    """Fused RMSNorm for ``x``: always on a GPU; on a CPU only with AVX-512, and for float32 (the only
    dtype of its CPU kernel); on other devices never."""
    place = x.place
    if place.is_gpu_place():
        return True
    return place.is_cpu_place() and x.dtype == paddle.float32 and fused_kernels_on_cpu()


def norm_weight_for(weight: paddle.Tensor) -> paddle.Tensor:
    """The weight :func:`plain_rms_norm` multiplies float32 activations by: ``weight · sqrt(H)``."""
    return weight * math.sqrt(weight.shape[-1])


def plain_rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float,
                   scaled_weight: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """RMSNorm over the last axis, normalised in float32, with Paddle's plain ``norm`` kernel.

    ``norm`` computes ``x / sqrt(Σx² + e)``; with ``e = H·eps`` that is
    ``x / sqrt(mean(x²) + eps) / sqrt(H)``. For float32 the ``sqrt(H)`` rides on the weight
    (``scaled_weight``, :func:`norm_weight_for`; derived here, one more kernel, if not given):
    two kernels instead of the textbook formula's six, within 2e-6 of it (measured against float64).
    Other dtypes follow the official order: normalise in float32, cast, then multiply by
    the weight."""
    h = x if x.dtype == paddle.float32 else _C_ops.cast(x, paddle.float32)
    normed = _C_ops.norm(h, h.ndim - 1, h.shape[-1] * eps, True)[0]
    if x.dtype == paddle.float32 and weight.dtype == paddle.float32:
        return _C_ops.multiply(normed, scaled_weight if scaled_weight is not None else norm_weight_for(weight))
    normed = _C_ops.cast(_C_ops.scale(normed, math.sqrt(h.shape[-1]), 0.0, True), x.dtype)
    return _C_ops.multiply(weight, normed)


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float, fused: bool,
             scaled_weight: Optional[paddle.Tensor] = None,
             residual: Optional[paddle.Tensor] = None) -> Tuple[paddle.Tensor, paddle.Tensor]:
    """``(rmsnorm(x + residual), x + residual)`` without gradients (``residual`` None:
    ``(rmsnorm(x), x)``). ``fused`` (:func:`use_fused_norm`): one fused kernel; else the
    residual add and :func:`plain_rms_norm`."""
    if fused:
        out = _C_ops.fused_rms_norm_quant(x, None, residual, weight, None, eps, x.ndim - 1, -1.0, 0, 0.0, 0.0)
        return out[0], (out[1] if residual is not None else x)
    total = x if residual is None else _C_ops.add(x, residual)
    return plain_rms_norm(total, weight, eps, scaled_weight), total


def softmax_last(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis. A contiguous float32 CPU tensor of at least
    :data:`SOFTMAX_MIN_ELEMENTS` that needs no gradient (attention scores at inference: prefill,
    the ViT) goes to oneDNN's kernel, *in place* (pass a temporary), 2–7× faster than Paddle's
    (``onednn.py``); everything else to Paddle's. The choice depends on the tensor alone, so the
    fused decode step and the layers, which both call this, take the same kernel."""
    if (math.prod(x.shape) >= SOFTMAX_MIN_ELEMENTS and x.dtype == paddle.float32 and paddle.in_dynamic_mode()
            and (x.stop_gradient or not paddle.is_grad_enabled()) and x.place.is_cpu_place()
            and x.is_contiguous() and onednn.available()):
        return onednn.softmax_(x)
    return _C_ops.softmax(x, -1) if paddle.in_dynamic_mode() else paddle.nn.functional.softmax(x, axis=-1)
