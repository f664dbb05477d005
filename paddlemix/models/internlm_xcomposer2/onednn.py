"""oneDNN kernels Paddle's CPU ops lack: a weight packed once for a few rows, a fast softmax and
a fast transpose.

**Packed weights** (:class:`PackedWeight`): batched decoding on a CPU.

Decoding a batch of 2–8 sequences multiplies 2–8 rows by every weight. On a CPU, the GEMM
kernels of MKL, OpenBLAS and oneDNN alike re-pack the weight in every call, so from memory they
run at a quarter of the bandwidth a single row gets (AMD EPYC Zen 3, 2 threads, 1024×2816:
4 rows 1.6–1.9 ms, one row 0.5). oneDNN's inner product with its weights in the blocked layout
it asks for (``brgemm``) reads the weight once per call instead: 4 rows 0.61 ms, the 92544-wide
head 23 ms for 4 rows against 59 (``benchmarks/README.md``). That layout is a second copy of the
weight, made once by :class:`PackedWeight`; :mod:`.row_gemm` decides who uses it.

This calls the oneDNN library bundled in Paddle's CPU wheel (``paddle/libs/libdnnl.so.*``) through
its C API with ``ctypes``: the same library Paddle's own oneDNN kernels use, on the threads of
the OpenMP runtime it shares with MKL. Nothing here runs at import; :func:`available` loads it.

Each row of a product is computed by the same kernel calls whatever the number of rows
(tested: a row in a batch of 1–8 gives the same bits as alone), so which sequences share a
batch does not change any one's logits.

**Softmax** (:func:`softmax_`): Paddle's CPU softmax over the last axis takes 1.4–7 ns per
element (it varies with the state of the OpenMP threads; measured on AMD EPYC Zen 3 and Intel
Xeon): 4–17 ms for the attention scores of one 405-token prefill layer (16 heads), against
2.3 ms for oneDNN's vectorised kernel on the same 2 threads.

**Transpose** (:func:`transpose_into`): loading a Hugging Face checkpoint turns every torch
``[out, in]`` linear weight into Paddle's ``[in, out]``. oneDNN's JIT reorder does that at
3–3.7 GB/s on 2 threads against 1.2–1.8 GB/s for NumPy copies of cache-sized tiles (AMD EPYC
Zen 3: 2816×1024 3.7 against 9.8 ms, the 92544×1024 table 103 against 210 ms). float32 only:
for bfloat16 this oneDNN has only its reference reorder (``simple:any``), 30× slower than NumPy.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import glob
import logging
import math
import os
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import paddle

logger = logging.getLogger(__name__)

__all__ = ["OneDNNError", "available", "PackedWeight", "softmax_", "transpose_into"]

# oneDNN C API constants (oneapi/dnnl/dnnl_types.h, v3)
_CPU_ENGINE = 1
_IN_ORDER_STREAM = 1
_F32 = 3
_TAG_ANY, _TAG_AB = 1, 3
_FORWARD_INFERENCE = 96
_SOFTMAX_ACCURATE = 0x30000
_SOFTMAX_KERNELS = 64  # shapes whose softmax primitive is kept (a prompt length each, at most)
_QUERY_IMPL_INFO = 8
_QUERY_WEIGHTS_MD = 131
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
_ALIGN = 64  # bytes: the packed buffer starts on a cache line
_P = ctypes.c_void_p
_DIMS = ctypes.c_int64 * 12  # dnnl_dims_t


class OneDNNError(RuntimeError):
    """A oneDNN call failed (status code in the message)."""


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


def _library_path() -> Optional[str]:
    found = sorted(glob.glob(os.path.join(os.path.dirname(paddle.__file__), "libs", "libdnnl.so*")))
    return found[0] if found else None


@functools.lru_cache(maxsize=1)
def _api() -> Optional["_API"]:
    path = _library_path()
    if path is None:
        return None
    try:
        return _API(ctypes.CDLL(path))
    except (OSError, AttributeError, OneDNNError) as err:  # missing symbol, no CPU engine
        logger.warning("oneDNN (%s) is not usable: %s", path, err)
        return None


def available() -> bool:
    """Whether Paddle's bundled oneDNN can be called (loads it on first use)."""
    return _api() is not None


class _API:
    """The few oneDNN C functions used here, their signatures, and one CPU engine and stream."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        sig = {
            "dnnl_engine_create": [ctypes.POINTER(_P), ctypes.c_int, ctypes.c_size_t],
            "dnnl_stream_create": [ctypes.POINTER(_P), _P, ctypes.c_uint],
            "dnnl_memory_desc_create_with_tag": [ctypes.POINTER(_P), ctypes.c_int, _DIMS, ctypes.c_int, ctypes.c_int],
            "dnnl_memory_desc_create_with_strides": [ctypes.POINTER(_P), ctypes.c_int, _DIMS, ctypes.c_int, _DIMS],
            "dnnl_memory_desc_destroy": [_P],
            "dnnl_inner_product_forward_primitive_desc_create": [ctypes.POINTER(_P), _P, ctypes.c_int, _P, _P, _P, _P,
                                                                 _P],
            "dnnl_reorder_primitive_desc_create": [ctypes.POINTER(_P), _P, _P, _P, _P, _P],
            "dnnl_softmax_forward_primitive_desc_create": [ctypes.POINTER(_P), _P, ctypes.c_int, ctypes.c_int, _P, _P,
                                                           ctypes.c_int, _P],
            "dnnl_primitive_desc_query": [_P, ctypes.c_int, ctypes.c_int, _P],
            "dnnl_primitive_desc_destroy": [_P],
            "dnnl_primitive_create": [ctypes.POINTER(_P), _P],
            "dnnl_primitive_destroy": [_P],
            "dnnl_memory_create": [ctypes.POINTER(_P), _P, _P, _P],
            "dnnl_memory_set_data_handle": [_P, _P],
            "dnnl_memory_destroy": [_P],
            "dnnl_primitive_execute": [_P, _P, ctypes.c_int, ctypes.POINTER(_ExecArg)],
            "dnnl_stream_wait": [_P],
        }
        for name, argtypes in sig.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.dnnl_primitive_desc_query_md.argtypes = [_P, ctypes.c_int, ctypes.c_int]
        lib.dnnl_primitive_desc_query_md.restype = _P
        lib.dnnl_memory_desc_get_size.argtypes = [_P]
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.engine = self.new(lib.dnnl_engine_create, _CPU_ENGINE, 0)
        self.stream = self.new(lib.dnnl_stream_create, self.engine, _IN_ORDER_STREAM)
        self._stream_lock = threading.Lock()  # a oneDNN stream is not thread-safe

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise OneDNNError(f"{what} failed with oneDNN status {status}")

    def new(self, create, *args) -> _P:
        handle = _P()
        self.check(create(ctypes.byref(handle), *args), create.__name__)
        return handle

    def plain(self, dims: Tuple[int, ...], tag: int = _TAG_AB) -> _P:
        """A float32 memory descriptor: row-major, or ``tag=_TAG_ANY`` (the layout a primitive prefers)."""
        return self.new(self.lib.dnnl_memory_desc_create_with_tag, len(dims), _DIMS(*dims), _F32, tag)

    def strided(self, dims: Tuple[int, ...], strides: Tuple[int, ...]) -> _P:
        """A float32 memory descriptor with explicit strides (elements)."""
        return self.new(self.lib.dnnl_memory_desc_create_with_strides, len(dims), _DIMS(*dims), _F32,
                        _DIMS(*strides))

    def inner_product(self, rows: int, k: int, n: int, weights_md: _P) -> _P:
        src, dst = self.plain((rows, k)), self.plain((rows, n))
        try:
            return self.new(self.lib.dnnl_inner_product_forward_primitive_desc_create, self.engine,
                            _FORWARD_INFERENCE, src, weights_md, None, dst, None)
        finally:
            self.lib.dnnl_memory_desc_destroy(src)
            self.lib.dnnl_memory_desc_destroy(dst)

    def impl_info(self, pd: _P) -> str:
        text = ctypes.c_char_p()
        self.check(self.lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, ctypes.byref(text)), "query impl")
        return (text.value or b"").decode()

    def execute(self, primitive: _P, args: ctypes.Array) -> None:
        with self._stream_lock:
            self.check(self.lib.dnnl_primitive_execute(primitive, self.stream, len(args), args), "execute")
            self.check(self.lib.dnnl_stream_wait(self.stream), "stream wait")

    def reorder(self, source_md: _P, source: int, target_md: _P, target: int) -> None:
        """Copy the memory at address ``source`` (layout ``source_md``) to ``target`` (``target_md``)."""
        lib = self.lib
        pd = self.new(lib.dnnl_reorder_primitive_desc_create, source_md, self.engine, target_md, self.engine, None)
        handles: list = []
        try:
            primitive = self.new(lib.dnnl_primitive_create, pd)
            try:
                for md, address in ((source_md, source), (target_md, target)):
                    handles.append(self.new(lib.dnnl_memory_create, md, self.engine, _P(address)))
                self.execute(primitive, (_ExecArg * 2)(_ExecArg(_ARG_SRC, handles[0]), _ExecArg(_ARG_DST, handles[1])))
            finally:
                lib.dnnl_primitive_destroy(primitive)
        finally:
            for handle in handles:
                lib.dnnl_memory_destroy(handle)
            lib.dnnl_primitive_desc_destroy(pd)


class _RowsKernel:
    """The primitive for ``rows`` rows and its memory objects (data handles set per call)."""

    def __init__(self, api: _API, rows: int, k: int, n: int, weights_md: _P, weights: int) -> None:
        lib = api.lib
        self.pd = api.inner_product(rows, k, n, weights_md)
        self.primitive = api.new(lib.dnnl_primitive_create, self.pd)
        src_md, dst_md = api.plain((rows, k)), api.plain((rows, n))
        self.src = api.new(lib.dnnl_memory_create, src_md, api.engine, None)
        self.dst = api.new(lib.dnnl_memory_create, dst_md, api.engine, None)
        lib.dnnl_memory_desc_destroy(src_md)
        lib.dnnl_memory_desc_destroy(dst_md)
        self.weights = api.new(lib.dnnl_memory_create, weights_md, api.engine, _P(weights))
        self.args = (_ExecArg * 3)(_ExecArg(_ARG_SRC, self.src), _ExecArg(_ARG_WEIGHTS, self.weights),
                                   _ExecArg(_ARG_DST, self.dst))
        self.impl = api.impl_info(self.pd)


class PackedWeight:
    """``weight`` (``[k, n]`` float32 on the CPU, as ``x @ weight``) copied into the layout
    oneDNN's inner product prefers for ``pack_rows`` rows; multiplies 1–``max_rows`` rows.

    The copy is made once, here: a later change to ``weight`` is not seen (pack again).
    Raises :class:`OneDNNError` where oneDNN cannot do it (the caller keeps the plain kernel)."""

    def __init__(self, weight: paddle.Tensor, max_rows: int, pack_rows: Optional[int] = None) -> None:
        api = _api()
        if api is None:
            raise OneDNNError("Paddle's oneDNN library is not available")
        if weight.ndim != 2 or weight.dtype != paddle.float32 or not weight.place.is_cpu_place():
            raise OneDNNError(f"only a 2-D float32 CPU weight can be packed, got {weight.dtype} {weight.shape}")
        self._api, self.max_rows = api, max_rows
        self.k, self.n = weight.shape
        self._lock = threading.Lock()  # the kernels' memory objects are shared state
        # inner product weights are [n, k] (out, in); ours is [k, n] row-major: strides (1, n)
        source_md = api.strided((self.n, self.k), (1, self.n))
        wanted_md = api.plain((self.n, self.k), _TAG_ANY)
        self._layout_pd = api.inner_product(pack_rows or max_rows, self.k, self.n, wanted_md)
        lib = api.lib
        lib.dnnl_memory_desc_destroy(wanted_md)
        self._weights_md = _P(lib.dnnl_primitive_desc_query_md(self._layout_pd, _QUERY_WEIGHTS_MD, 0))
        self.nbytes = int(lib.dnnl_memory_desc_get_size(self._weights_md))
        self._buffer = np.empty(self.nbytes + _ALIGN, dtype=np.uint8)
        self._address = self._buffer.ctypes.data + (-self._buffer.ctypes.data) % _ALIGN
        try:
            api.reorder(source_md, weight.data_ptr(), self._weights_md, self._address)
        finally:
            lib.dnnl_memory_desc_destroy(source_md)
        self._kernels: Dict[int, _RowsKernel] = {}

    def kernel(self, rows: int) -> _RowsKernel:
        """The primitive for ``rows`` rows (made on first use)."""
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"a packed weight multiplies 1 to {self.max_rows} rows, got {rows}")
        found = self._kernels.get(rows)
        if found is None:
            found = self._kernels[rows] = _RowsKernel(self._api, rows, self.k, self.n, self._weights_md,
                                                      self._address)
        return found

    def matmul(self, x: paddle.Tensor, out: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """``x @ weight`` for ``x`` ``[..., k]`` float32 with at most ``max_rows`` rows, into ``out``
        (``[..., n]`` float32, overwritten) or a new tensor."""
        lead = x.shape[:-1]
        rows = math.prod(lead)
        if not x.is_contiguous():
            x = x.contiguous()
        if out is None:
            out = paddle.empty([*lead, self.n], dtype=paddle.float32)
        elif out.shape != [*lead, self.n] or out.dtype != paddle.float32:
            raise ValueError(f"output {out.dtype} {out.shape} does not fit {rows} rows of width {self.n}")
        lib = self._api.lib
        with self._lock:
            kernel = self.kernel(rows)
            lib.dnnl_memory_set_data_handle(kernel.src, _P(x.data_ptr()))
            lib.dnnl_memory_set_data_handle(kernel.dst, _P(out.data_ptr()))
            self._api.execute(kernel.primitive, kernel.args)
        return out

    def __del__(self) -> None:
        lib = getattr(getattr(self, "_api", None), "lib", None)
        if lib is None:
            return
        for kernel in getattr(self, "_kernels", {}).values():
            for handle in (kernel.src, kernel.dst, kernel.weights):
                lib.dnnl_memory_destroy(handle)
            lib.dnnl_primitive_destroy(kernel.primitive)
            lib.dnnl_primitive_desc_destroy(kernel.pd)
        if getattr(self, "_layout_pd", None) is not None:
            lib.dnnl_primitive_desc_destroy(self._layout_pd)


class _SoftmaxKernel:
    """The softmax primitive over the last axis of a ``[rows, cols]`` float32 tensor, in place."""

    def __init__(self, api: _API, rows: int, cols: int) -> None:
        lib = api.lib
        md = api.plain((rows, cols))
        try:
            self.pd = api.new(lib.dnnl_softmax_forward_primitive_desc_create, api.engine, _FORWARD_INFERENCE,
                              _SOFTMAX_ACCURATE, md, md, 1, None)
            self.primitive = api.new(lib.dnnl_primitive_create, self.pd)
            self.memory = api.new(lib.dnnl_memory_create, md, api.engine, None)
        finally:
            lib.dnnl_memory_desc_destroy(md)
        # in place: the same memory object is the source and the destination
        self.args = (_ExecArg * 2)(_ExecArg(_ARG_SRC, self.memory), _ExecArg(_ARG_DST, self.memory))
        self._lib = lib

    def __del__(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is not None:
            lib.dnnl_memory_destroy(self.memory)
            lib.dnnl_primitive_destroy(self.primitive)
            lib.dnnl_primitive_desc_destroy(self.pd)


_softmax_kernels: "collections.OrderedDict[Tuple[int, int], _SoftmaxKernel]" = collections.OrderedDict()
_softmax_lock = threading.Lock()


def softmax_(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis of ``x`` (contiguous float32 on the CPU, no gradient), in place;
    returns ``x``. Raises :class:`OneDNNError` where oneDNN is not available."""
    api = _api()
    if api is None:
        raise OneDNNError("Paddle's oneDNN library is not available")
    cols = x.shape[-1]
    rows = math.prod(x.shape) // cols
    with _softmax_lock:
        kernel = _softmax_kernels.get((rows, cols))
        if kernel is None:
            kernel = _softmax_kernels[(rows, cols)] = _SoftmaxKernel(api, rows, cols)
            if len(_softmax_kernels) > _SOFTMAX_KERNELS:
                _softmax_kernels.popitem(last=False)
        else:
            _softmax_kernels.move_to_end((rows, cols))
        api.lib.dnnl_memory_set_data_handle(kernel.memory, _P(x.data_ptr()))
        api.execute(kernel.primitive, kernel.args)
    return x


def transpose_into(target: np.ndarray, source: np.ndarray) -> None:
    """``target[...] = source.T`` for 2-D float32 arrays of any positive strides (e.g. ``target`` a
    column block of a larger array), by oneDNN's reorder. Raises :class:`OneDNNError` where oneDNN
    is not available or cannot take the arrays (the caller copies another way)."""
    api = _api()
    if api is None:
        raise OneDNNError("Paddle's oneDNN library is not available")
    if source.ndim != 2 or target.shape != source.shape[::-1]:
        raise OneDNNError(f"cannot transpose {source.shape} into {target.shape}")
    if source.dtype != np.float32 or target.dtype != np.float32:
        raise OneDNNError(f"only float32 is transposed by oneDNN, got {source.dtype} into {target.dtype}")
    strides = [s // source.itemsize for s in (*source.strides, *target.strides)]
    if any(s <= 0 or s * source.itemsize != b for s, b in zip(strides, (*source.strides, *target.strides))):
        raise OneDNNError(f"strides {source.strides} / {target.strides} are not positive whole elements")
    # both described as the source's [rows, cols]: the target's element (i, j) sits at j*stride0 + i*stride1
    source_md = api.strided(source.shape, (strides[0], strides[1]))
    target_md = api.strided(source.shape, (strides[3], strides[2]))
    try:
        api.reorder(source_md, source.ctypes.data, target_md, target.ctypes.data)
    finally:
        api.lib.dnnl_memory_desc_destroy(source_md)
        api.lib.dnnl_memory_desc_destroy(target_md)
