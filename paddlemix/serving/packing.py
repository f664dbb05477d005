"""Whether the serving engine packs the model's decode weights for batched CPU decoding.

A CPU decode step of a batch multiplies a few rows by every weight, which the CPU's BLAS
libraries do at a fraction of the speed of one row, re-packing the weight in each call; a
packed copy made once (``models/internlm_xcomposer2/onednn.py``) reads each weight once per
step whatever the batch size. It costs a second copy of those weights, so ``auto`` makes it
only where it pays and fits: float32 weights on a CPU, batches of more than one row, and
enough free memory for the copy twice over.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Optional, Tuple

import paddle

from paddlemix.models.internlm_xcomposer2 import onednn
from paddlemix.models.internlm_xcomposer2.row_gemm import weight_bytes

logger = logging.getLogger(__name__)

__all__ = ["PACKING", "MEMINFO", "available_memory", "packing_decision", "pack_model"]

PACKING = ("auto", "on", "off")
MEMINFO = "/proc/meminfo"
_HEADROOM = 2  # auto packs when the free memory holds the copy this many times over


def available_memory(path: str = MEMINFO) -> Optional[int]:
    """``MemAvailable`` in bytes, or None where it cannot be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def packing_decision(model: Any, max_batch_size: int, choice: str,
                     free_bytes: Optional[int] = None) -> Tuple[bool, str]:
    """(pack or not, why) for ``choice`` in :data:`PACKING`; ``free_bytes`` default: read now."""
    if choice not in PACKING:
        raise ValueError(f"weight packing must be one of {', '.join(PACKING)}, got {choice!r}")
    if choice == "off":
        return False, "off"
    weights = model.decode_weights() if hasattr(model, "decode_weights") else []
    if not weights or any(w.dtype != paddle.float32 or not w.place.is_cpu_place() for w in weights):
        if choice == "on":
            raise ValueError("weight packing needs the model's decode weights in float32 on the CPU")
        return False, "not float32 weights on a CPU"
    if not onednn.available():
        if choice == "on":
            raise ValueError("weight packing needs Paddle's oneDNN library, which is not available")
        return False, "oneDNN not available"
    if choice == "on":
        return True, "on"
    if max_batch_size < 2:
        return False, "batches of one row (a single row already streams each weight once)"
    needed = sum(weight_bytes(w) for w in weights)
    free = available_memory() if free_bytes is None else free_bytes
    if free is not None and free < _HEADROOM * needed:
        return False, f"{needed / 2**30:.1f} GiB copy, {free / 2**30:.1f} GiB free"
    return True, "auto"


def pack_model(model: Any, max_batch_size: int, choice: str) -> int:
    """Pack the model's decode weights if :func:`packing_decision` says so; returns the bytes added."""
    pack, why = packing_decision(model, max_batch_size, choice)
    if not pack:
        logger.info("decode weights not packed for batched decoding: %s", why)
        return 0
    start = time.perf_counter()
    # "on" packs even the weights small enough for the caches (tests on tiny models use it)
    added = model.pack_for_batched_decoding(max_batch_size, **({"min_bytes": 0} if choice == "on" else {}))
    logger.info("decode weights packed for batches of up to %d rows: %.2f GiB in %.1f s", max_batch_size,
                added / 2**30, time.perf_counter() - start)
    return added
