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

The user's own environment wins: a variable already set (to anything) is left as it is, and
``IXC2_CPU_TUNING=0`` turns all of this off. Intel CPUs get nothing (MKL already picks their
best path); a flag the CPU does not report is never asked for (forcing AVX-512 code on an AVX2
CPU would crash it).
"""
from __future__ import annotations

import os
from typing import Dict, FrozenSet, MutableMapping, Optional

__all__ = ["cpu_info", "mkl_cpu_type", "configure_cpu_environment", "describe_applied", "MKL_AVX2"]

CPUINFO = "/proc/cpuinfo"
MKL_AVX2 = "5"  # MKL_DEBUG_CPU_TYPE of MKL's AVX2 (Haswell) path
OMP_NO_SPIN = "0"  # KMP_BLOCKTIME: OpenMP workers sleep as soon as a parallel region ends
AVX2_FLAGS = frozenset({"avx2", "fma"})
OPT_OUT = "IXC2_CPU_TUNING"
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


def describe_applied() -> Optional[str]:
    """One log line saying what :func:`configure_cpu_environment` set, or None."""
    if not applied:
        return None
    parts = []
    if "MKL_DEBUG_CPU_TYPE" in applied:
        parts.append(f"MKL_DEBUG_CPU_TYPE={applied['MKL_DEBUG_CPU_TYPE']}, so MKL takes its AVX2 path")
    if "KMP_BLOCKTIME" in applied:
        parts.append(f"KMP_BLOCKTIME={applied['KMP_BLOCKTIME']}, so MKL's threads do not spin between calls")
    return (f"{applied['cpu']}: {'; '.join(parts)} (set them yourself, or {OPT_OUT}=0, to choose otherwise)")
