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
(prefill, training) stay on Paddle's matmul: OpenBLAS is not faster there; so do weights under
:data:`MIN_WEIGHT_BYTES`, which sit in the CPU's caches, where the extra Python steps cost more
than the kernel saves (64×224: 13.8 µs against Paddle's 8.4).

Batched decoding (2–8 rows, a serving batch) is slow on every CPU BLAS, which re-packs the
weight in each call; :func:`pack_weights` copies weights once into oneDNN's own layout
(:mod:`.onednn`), and from then on every product of 2 to ``max_rows`` float32 rows by such a
weight without gradients takes that copy, on any CPU vendor: the fused decode step, the layers
and the head alike, so they stay bit-identical to each other. A single row keeps the kernel
above, which streams a weight faster than the packed copy does for one row (AMD EPYC Zen 3,
interleaved: 1024×2816 0.48 against 0.55 ms). The copy doubles those weights' memory, so only
callers that decode batches ask for it (the serving engine); :func:`unpack_weights` drops it.

:func:`set_row_gemm` forces a choice (tests run both); ``IXC2_ROW_GEMM=paddle|numpy`` in the
environment does the same for a whole process.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
from typing import Dict, Iterable, Optional, Tuple, Union

import numpy as np
import paddle

from ...cpu_env import cpu_info
from .onednn import OneDNNError, PackedWeight

logger = logging.getLogger(__name__)

__all__ = ["ROW_GEMMS", "ENV", "MIN_WEIGHT_BYTES", "choose_row_gemm", "row_gemm", "set_row_gemm", "host_gemm_for",
           "takes_host_gemm", "weight_view", "host_weight", "RowOutput", "row_matmul", "matmul", "weight_bytes",
           "pack_weights", "unpack_weights", "packed_weight"]

ROW_GEMMS = ("paddle", "numpy")
ENV = "IXC2_ROW_GEMM"
MIN_WEIGHT_BYTES = 1 << 20  # smaller weights stay on Paddle's matmul (see above)
_forced: Optional[str] = None
_min_weight_bytes = MIN_WEIGHT_BYTES
_FLOAT_P = ctypes.POINTER(ctypes.c_float)
_packed: Dict[int, Tuple[paddle.Tensor, PackedWeight]] = {}  # id(weight) → (weight, its packed copy)


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


def weight_bytes(weight: paddle.Tensor) -> int:
    """The bytes of a 2-D weight."""
    return weight.shape[0] * weight.shape[1] * weight.element_size()


def pack_weights(weights: Iterable[paddle.Tensor], max_rows: int, min_bytes: int = MIN_WEIGHT_BYTES,
                 pack_rows: Optional[int] = None) -> int:
    """Pack each float32 CPU ``weight`` of at least ``min_bytes`` (smaller ones sit in the caches,
    where Paddle's kernel is as fast) for products of 1 to ``max_rows`` rows (layout chosen for
    ``pack_rows``, default ``max_rows``); returns the bytes of the copies made. A weight oneDNN
    cannot take keeps its plain kernel (logged). Pack again after changing a weight."""
    total = 0
    for weight in weights:
        if weight_bytes(weight) < min_bytes:
            continue
        try:
            packed = PackedWeight(weight, max_rows, pack_rows)
        except OneDNNError as err:
            logger.warning("weight %s %s keeps its plain kernel: %s", weight.name, weight.shape, err)
            continue
        _packed[id(weight)] = (weight, packed)
        total += packed.nbytes
    return total


def unpack_weights(weights: Optional[Iterable[paddle.Tensor]] = None) -> None:
    """Drop the packed copies of ``weights`` (default: all)."""
    if weights is None:
        _packed.clear()
    for weight in weights or ():
        _packed.pop(id(weight), None)


def packed_weight(weight: paddle.Tensor) -> Optional[PackedWeight]:
    """The packed copy of ``weight`` made by :func:`pack_weights`, if any."""
    found = _packed.get(id(weight))
    return found[1] if found is not None and found[0] is weight else None


def _packed_for(rows: int, weight: paddle.Tensor) -> Optional[PackedWeight]:
    packed = packed_weight(weight) if _packed and rows > 1 else None
    return packed if packed is not None and rows <= packed.max_rows else None


def host_gemm_for(rows: int, dtype: paddle.dtype, weight: paddle.Tensor) -> bool:
    """Whether ``rows`` rows of ``dtype`` times ``weight`` go to a packed copy (2 or more rows) or
    NumPy (one row) (gradients not asked about)."""
    if dtype == paddle.float32 and _packed_for(rows, weight) is not None:
        return True
    return (rows == 1 and dtype == paddle.float32 and weight.dtype == paddle.float32 and weight.ndim == 2
            and weight_bytes(weight) >= _min_weight_bytes
            and weight.place.is_cpu_place()
            and row_gemm() == "numpy")


def takes_host_gemm(x: paddle.Tensor, weight: paddle.Tensor) -> bool:
    """Whether ``x @ weight`` goes to the host kernel: a packed copy (a few rows) or NumPy (one row),
    float32 on a CPU, no gradient wanted (then :func:`host_weight` is what to multiply by)."""
    if not paddle.in_dynamic_mode():  # a static graph (to_static) keeps Paddle's op
        return False
    no_graph = not paddle.is_grad_enabled() or (x.stop_gradient and weight.stop_gradient)
    return no_graph and x.ndim > 0 and host_gemm_for(math.prod(x.shape[:-1]), x.dtype, weight)


def weight_view(weight: paddle.Tensor) -> np.ndarray:
    """A read-only NumPy view of ``weight``'s memory (no copy)."""
    return np.from_dlpack(weight.detach())


def host_weight(weight: paddle.Tensor, rows: int) -> Union[np.ndarray, PackedWeight]:
    """What :func:`row_matmul` multiplies ``rows`` rows by, where :func:`host_gemm_for` said yes:
    ``weight``'s packed copy, or the NumPy view of it for one row."""
    packed = _packed_for(rows, weight)
    return packed if packed is not None else weight_view(weight)


class RowOutput:
    """A Paddle tensor ``[*lead, n]`` and a writable NumPy ``[1, n]`` view of its memory."""

    def __init__(self, lead: list, n: int) -> None:
        self.tensor = paddle.empty([*lead, n], dtype=paddle.float32)
        self.array = np.ctypeslib.as_array(ctypes.cast(self.tensor.data_ptr(), _FLOAT_P), shape=(1, n))


def row_matmul(x: paddle.Tensor, weight: Union[np.ndarray, PackedWeight], out: Optional[RowOutput] = None
               ) -> paddle.Tensor:
    """``x`` (float32) ``@ weight`` (:func:`host_weight`'s: a packed copy, for up to its ``max_rows``
    rows, or a ``[k, n]`` view, for one row, with NumPy's BLAS), into ``out`` (reused: its tensor is
    overwritten) or a new tensor."""
    if isinstance(weight, PackedWeight):
        return weight.matmul(x, out.tensor if out is not None else None)
    out = out if out is not None else RowOutput(x.shape[:-1], weight.shape[1])
    np.matmul(x.numpy().reshape(1, weight.shape[0]), weight, out=out.array)
    return out.tensor


def matmul(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """``x @ weight`` on the kernel :func:`takes_host_gemm` picks (Paddle's otherwise)."""
    if takes_host_gemm(x, weight):
        return row_matmul(x, host_weight(weight, math.prod(x.shape[:-1])))
    return paddle.matmul(x, weight)
