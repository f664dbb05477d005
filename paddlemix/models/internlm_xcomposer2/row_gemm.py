"""Which BLAS multiplies one row by a weight matrix on a CPU: the decode step's GEMVs.

A decode step multiplies a single row by every weight of the model (and the 92544-wide
head), so it is bound by how fast the weights stream from memory. On non-Intel CPUs the
MKL bundled in Paddle's wheel does this badly even on its AVX2 path
(``MKL_DEBUG_CPU_TYPE=5``, see ``paddlemix/cpu_env.py``): measured on an AMD EPYC (Zen 3,
2 vCPUs, 2 threads), the 8 layers' GEMVs of the bench model (378 MB of weights) take 29 ms
with Paddle's ``matmul`` and 17.7 ms with NumPy's OpenBLAS on the same weights, and image
chat decodes 0–23 % faster end to end in interleaved runs (median ≈ 15 %;
``benchmarks/README.md``). On Intel, MKL is the faster one and stays.

So on a non-Intel CPU, a float32 single-row product without gradients goes to NumPy: the
weight is read in place (a zero-copy DLPack view of the Paddle tensor) and the result is
written straight into a Paddle tensor's memory, so nothing is copied but the one input row.
Every path that multiplies a single row without gradients (the fused decode step, the layers,
the head) takes the same kernel, so they stay bit-identical to each other. Batches of rows
(prefill, training, serving batches) stay on Paddle's matmul: OpenBLAS is not faster there
(4×1024×2816: 1.9 ms against MKL's 0.7 ms); so do weights under :data:`MIN_WEIGHT_BYTES`, which
sit in the CPU's caches, where the extra Python steps cost more than the kernel saves
(64×224: 13.8 µs against Paddle's 8.4).

:func:`set_row_gemm` forces a choice (tests run both); ``IXC2_ROW_GEMM=paddle|numpy`` in the
environment does the same for a whole process.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from typing import Optional

import numpy as np
import paddle

from ...cpu_env import cpu_info

logger = logging.getLogger(__name__)

__all__ = ["ROW_GEMMS", "ENV", "MIN_WEIGHT_BYTES", "choose_row_gemm", "row_gemm", "set_row_gemm", "host_gemm_for",
           "takes_host_gemm", "weight_view", "RowOutput", "row_matmul", "matmul"]

ROW_GEMMS = ("paddle", "numpy")
ENV = "IXC2_ROW_GEMM"
MIN_WEIGHT_BYTES = 1 << 20  # smaller weights stay on Paddle's matmul (see above)
_forced: Optional[str] = None
_min_weight_bytes = MIN_WEIGHT_BYTES
_FLOAT_P = ctypes.POINTER(ctypes.c_float)


def _checked(choice: str, what: str) -> str:
    if choice not in ROW_GEMMS:
        raise ValueError(f"{what}: expected one of {', '.join(ROW_GEMMS)}")
    return choice


def choose_row_gemm(vendor: str, env_value: Optional[str] = None) -> str:
    """The row kernel for a CPU vendor (``/proc/cpuinfo``'s ``vendor_id``), unless ``env_value``
    (``$IXC2_ROW_GEMM``) names one: Paddle's on Intel (or unknown), NumPy's elsewhere."""
    if env_value:
        return _checked(env_value, f"{ENV}={env_value!r}")
    return "paddle" if not vendor or vendor == "GenuineIntel" else "numpy"


@functools.lru_cache(maxsize=1)
def _default_row_gemm() -> str:
    vendor = str(cpu_info().get("vendor", ""))
    choice = choose_row_gemm(vendor, os.environ.get(ENV))
    if choice == "numpy":
        logger.info("single-row products (decoding) use NumPy's BLAS (%s CPU; %s=paddle for Paddle's)", vendor, ENV)
    return choice


def row_gemm() -> str:
    """``"paddle"`` or ``"numpy"``: the kernel of single-row float32 CPU products in this process."""
    return _forced or _default_row_gemm()


def set_row_gemm(choice: Optional[str], min_weight_bytes: int = MIN_WEIGHT_BYTES) -> None:
    """Force ``"paddle"``/``"numpy"`` for this process, or ``None`` to decide from the CPU again;
    ``min_weight_bytes``: the smallest weight NumPy's kernel takes (0: every one, as tests do)."""
    global _forced, _min_weight_bytes
    _forced = None if choice is None else _checked(choice, f"row GEMM {choice!r}")
    _min_weight_bytes = min_weight_bytes


def host_gemm_for(rows: int, dtype: paddle.dtype, weight: paddle.Tensor) -> bool:
    """Whether ``rows`` rows of ``dtype`` times ``weight`` go to NumPy (gradients not asked about)."""
    return (rows == 1 and dtype == paddle.float32 and weight.dtype == paddle.float32 and weight.ndim == 2
            and weight.shape[0] * weight.shape[1] * weight.element_size() >= _min_weight_bytes
            and weight.place.is_cpu_place()
            and row_gemm() == "numpy")


def takes_host_gemm(x: paddle.Tensor, weight: paddle.Tensor) -> bool:
    """Whether ``x @ weight`` goes to NumPy: one row, float32 on a CPU, no gradient wanted."""
    if not paddle.in_dynamic_mode():  # a static graph (to_static) keeps Paddle's op
        return False
    no_graph = not paddle.is_grad_enabled() or (x.stop_gradient and weight.stop_gradient)
    return no_graph and x.ndim > 0 and host_gemm_for(math.prod(x.shape[:-1]), x.dtype, weight)


def weight_view(weight: paddle.Tensor) -> np.ndarray:
    """A read-only NumPy view of ``weight``'s memory (no copy)."""
    return np.from_dlpack(weight.detach())


class RowOutput:
    """A Paddle tensor ``[*lead, n]`` and a writable NumPy ``[1, n]`` view of its memory."""

    def __init__(self, lead: list, n: int) -> None:
        self.tensor = paddle.empty([*lead, n], dtype=paddle.float32)
        self.array = np.ctypeslib.as_array(ctypes.cast(self.tensor.data_ptr(), _FLOAT_P), shape=(1, n))


def row_matmul(x: paddle.Tensor, weight: np.ndarray, out: Optional[RowOutput] = None) -> paddle.Tensor:
    """``x`` (one row, float32, any leading shape of size 1) ``@ weight`` (``[k, n]`` view) with
    NumPy's BLAS, into ``out`` (reused: its tensor is overwritten) or a new tensor."""
    out = out if out is not None else RowOutput(x.shape[:-1], weight.shape[1])
    np.matmul(x.numpy().reshape(1, weight.shape[0]), weight, out=out.array)
    return out.tensor


def matmul(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """``x @ weight`` on the kernel :func:`takes_host_gemm` picks (Paddle's otherwise)."""
    if takes_host_gemm(x, weight):
        return row_matmul(x, weight_view(weight))
    return paddle.matmul(x, weight)
