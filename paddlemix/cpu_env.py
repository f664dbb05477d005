"""CPU-vendor-aware settings that must be in the environment before Paddle (and its MKL) loads.

Paddle's CPU wheel multiplies float32 matrices with the MKL-ML library it bundles, and MKL picks
a slow generic code path on CPUs that are not Intel's (measured on AMD EPYC, Zen 3 and Zen 4:
a 405×1024×2816 GEMM at 18–26 GFLOP/s, against 87–99 with the right path and 59–159 for
NumPy's OpenBLAS on the same cores). This MKL still honours ``MKL_DEBUG_CPU_TYPE``, which selects
the code path by instruction set instead of by vendor: ``5`` = AVX2 (needs AVX2 + FMA), the one
path chosen here. (``6`` is not Skylake's AVX-512: on a Zen 4, which has AVX-512 F/CD/BW/DQ/VL, it
dies with SIGILL in the first decode step, so no other value is used.) It is read once, when MKL
loads, so only entry points
(CLIs, benchmarks, the test suite) call :func:`configure_cpu_environment`, first thing; the
library never changes the environment at import.

On the same CPUs ``KMP_BLOCKTIME=0``: a decode step there multiplies its rows with NumPy's
OpenBLAS (``models/internlm_xcomposer2/row_gemm.py``) between Paddle's own kernels, and MKL's
OpenMP workers otherwise spin for 200 ms after each of its calls, taking a core from OpenBLAS
on a 2-core machine (measured: image chat decode 0.68 → 0.71 of the copy-bandwidth bound;
prefill and training steps unchanged within noise).

On every CPU, :func:`configure_allocator` (called by the training entry points, the fine-tuning
tool and the quickstart, first thing) tells glibc's ``malloc`` to serve every allocation from its heap and to keep freed
memory mapped (``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` 2 GiB). By default a block over
32 MB (a 92544-row embedding gradient, the logits of a training sample, the vocabulary table's
AdamW moments) gets fresh pages from the kernel on every allocation and returns them on free, so
each training step faults every page of those tensors in again: on the KVM guests measured here
about 3 µs per 4 KiB page, 0.3 s for one 379 MB table. With the setting the memory is reused
(AMD EPYC Zen 3: zeroing a fresh 379 MB tensor 290 → 35 ms, the embedding's backward 370 → 15 ms,
a full training step of the bench model 5.8–6.4 → 4.7–5.6 s in interleaved runs). The costs: the
process keeps its peak memory mapped instead of handing it back between steps, and a checkpoint
loads slower under it (the bench model's 1.19 GB: 1.10 → 1.49 s, interleaved), which is why chat,
serving and the other CLIs do not take it.

The user's own environment wins: a variable already set (to anything; for the allocator any
``MALLOC_*_`` variable or a ``glibc.malloc`` tunable) is left as it is, and ``IXC2_CPU_TUNING=0``
turns all of this off. Intel CPUs get no MKL setting (MKL already picks their
best path); a flag the CPU does not report is never asked for (forcing AVX-512 code on an AVX2
CPU would crash it).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any, Dict, FrozenSet, Mapping, MutableMapping, Optional

__all__ = ["cpu_info", "mkl_cpu_type", "configure_cpu_environment", "configure_allocator", "describe_applied",
           "MKL_AVX2"]

CPUINFO = "/proc/cpuinfo"
MKL_AVX2 = "5"  # MKL_DEBUG_CPU_TYPE of MKL's AVX2 (Haswell) path
OMP_NO_SPIN = "0"  # KMP_BLOCKTIME: OpenMP workers sleep as soon as a parallel region ends
AVX2_FLAGS = frozenset({"avx2", "fma"})
OPT_OUT = "IXC2_CPU_TUNING"
# glibc's mallopt parameters (malloc.h) and the environment variables that set them at start-up
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEPT_FREE_BYTES = 2**31 - 1  # the largest int mallopt takes: freed memory kept mapped at the heap's top
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
applied: Dict[str, str] = {}  # what configure_cpu_environment set in this process (CLIs log it once logging is up)


def cpu_info(path: str = CPUINFO) -> Dict[str, object]:
    """``{"vendor", "model", "family_model", "flags"}`` of the first CPU in ``/proc/cpuinfo``
    (empty where the file does not exist, e.g. not on Linux); ``family_model`` e.g. ``"25-1"``
    (a VM's model name, "AMD EPYC", often hides which generation it is)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    family_model = "-".join(fields[k] for k in ("cpu family", "model") if fields.get(k))
    return {"vendor": fields.get("vendor_id", ""), "model": fields.get("model name", ""),
            "family_model": family_model, "flags": frozenset(fields.get("flags", "").split())}


def mkl_cpu_type(vendor: str, flags: FrozenSet[str]) -> Optional[str]:
    """The ``MKL_DEBUG_CPU_TYPE`` for a CPU, or None (Intel, or no AVX2: leave MKL alone)."""
    if not vendor or vendor == "GenuineIntel":
        return None
    return MKL_AVX2 if AVX2_FLAGS <= flags else None


def configure_cpu_environment(environ: Optional[MutableMapping[str, str]] = None,
                              info: Optional[Dict[str, object]] = None) -> Dict[str, str]:
    """Set what this CPU needs in ``environ`` (default ``os.environ``) unless the user set it or
    opted out; returns what was set. Call before anything imports Paddle."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return {}
    info = cpu_info() if info is None else info
    value = mkl_cpu_type(str(info.get("vendor", "")), frozenset(info.get("flags", frozenset())))
    if value is None:
        return {}
    wanted = {"MKL_DEBUG_CPU_TYPE": value, "KMP_BLOCKTIME": OMP_NO_SPIN}
    settings = {name: v for name, v in wanted.items() if name not in environ}
    environ.update(settings)
    if settings:
        applied.update(settings, cpu=f"{info.get('vendor')} {info.get('model')}")
    return settings


def _glibc() -> Optional[Any]:
    """This process's C library if it is glibc (whose ``mallopt`` parameters are used here), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def configure_allocator(environ: Optional[Mapping[str, str]] = None, libc: Optional[Any] = None) -> bool:
    """Make glibc's ``malloc`` reuse freed memory instead of returning it to the kernel (see the module
    docstring), unless the user set the allocator up or opted out; ``libc`` default: this process's
    own (nothing happens where it is not glibc). Returns whether it was done."""
    environ = os.environ if environ is None else environ
    if (environ.get(OPT_OUT, "1") == "0" or any(name in environ for name in MALLOC_ENV)
            or "glibc.malloc" in environ.get("GLIBC_TUNABLES", "")):
        return False
    libc = _glibc() if libc is None else libc
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    done = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES) == 1
    if done:
        applied["allocator"] = "heap"
    return done


def describe_applied() -> Optional[str]:
    """One log line saying what :func:`configure_cpu_environment` and :func:`configure_allocator` set,
    or None."""
    if not applied:
        return None
    parts = []
    if "MKL_DEBUG_CPU_TYPE" in applied:
        parts.append(f"MKL_DEBUG_CPU_TYPE={applied['MKL_DEBUG_CPU_TYPE']}, so MKL takes its AVX2 path")
    if "KMP_BLOCKTIME" in applied:
        parts.append(f"KMP_BLOCKTIME={applied['KMP_BLOCKTIME']}, so MKL's threads do not spin between calls")
    if "allocator" in applied:
        parts.append("malloc keeps freed memory for reuse (no page faults re-touching large tensors)")
    where = f"{applied['cpu']}: " if "cpu" in applied else ""
    return f"{where}{'; '.join(parts)} (set them yourself, or {OPT_OUT}=0, to choose otherwise)"
