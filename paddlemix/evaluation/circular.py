"""MMBench's circular evaluation, as VLMEvalKit builds and scores it.

A question with n options is asked n times, its options rotated each time; it counts as right
only if every pass is answered right. The published MMBench TSVs already hold the rotated copies
(copy k of question i has index ``i + k * 1e6`` and, in VLMEvalKit's files, its original's index
in place of the image). For a file without copies, :func:`rotated_copies` builds them the way
VLMEvalKit's ``vlmutil circular`` does: the leading options rotate; a last option such as
"All of the above", "None of these" or "Both A and B" keeps its place (and letter)::

    pass   index      A   B   C   D     answer
    0      i          oA  oB  oC  oD    unchanged
    1      i + 1e6    oD  oA  oB  oC    A→B, B→C, C→D, D→A
    2      i + 2e6    oC  oD  oA  oB    A→C, ...
    3      i + 3e6    oB  oC  oD  oA    A→D, ...
"""
from __future__ import annotations

import string
from typing import AbstractSet, Any, Dict, Iterable, List, Mapping

from .prompts import is_missing

__all__ = ["GROUP_OFFSET", "MAX_CIRCULAR_OPTIONS", "copy_offset", "group_index", "is_rotated_copy",
           "rotated_copies", "rotation_size"]

GROUP_OFFSET = 10**6  # VLMEvalKit's scorer groups passes by ``index % 1e6``
MAX_CIRCULAR_OPTIONS = 4  # VLMEvalKit's builder refuses an E column
_FIXED_LAST_WORDS = ("all", "none")


def group_index(index: int) -> int:
    """The original question's index of a pass (VLMEvalKit's ``g_index``)."""
    return int(index % GROUP_OFFSET)


def is_rotated_copy(index: int, indices: AbstractSet[int]) -> bool:
    """Whether ``index`` is a rotated copy of another row of the file (not merely a big index)."""
    original = group_index(index)
    return original != index and original in indices


def copy_offset(indices: Iterable[int]) -> int:
    """The smallest power of ten ≥ 1e6 above every index (VLMEvalKit's ``OFFSET``)."""
    offset, top = GROUP_OFFSET, max(indices, default=0)
    while top >= offset:
        offset *= 10
    return offset


def _rotates(option: Any, n: int) -> bool:
    """VLMEvalKit's ``okn``: False for an option that refers to the others ("A, B and C",
    "all of the above", "none") and must stay last."""
    words = str(option).replace(",", " ").split()
    if all(letter in words for letter in string.ascii_uppercase[: n - 1]):
        return False
    lowered = str(option).lower().replace(",", " ").split()
    return not any(word in lowered for word in _FIXED_LAST_WORDS)


def _has(row: Mapping[str, Any], letter: str) -> bool:
    return letter in row and not is_missing(row[letter])


def rotation_size(row: Mapping[str, Any]) -> int:
    """How many leading options rotate (2-4): a fixed last option is left out, as VLMEvalKit does."""
    if _has(row, "E"):
        raise ValueError("circular evaluation handles up to 4 options (as VLMEvalKit's); this row has an E")
    size = 4 if _has(row, "D") else 3 if _has(row, "C") else 2
    if size == 4 and not _rotates(row["D"], 4):
        size = 3
    if size == 3 and not _rotates(row["C"], 3):
        size = 2
    return size


def rotated_copies(row: Mapping[str, Any], offset: int) -> List[Dict[str, Any]]:
    """Passes 1..n-1 of ``row`` (a dict with ``index``, ``A``-``D``, ``answer``, ``image``): options
    rotated, the answer letter moved with its option, ``image`` pointing at the original's index and
    ``group`` holding it."""
    size = rotation_size(row)
    letters = string.ascii_uppercase[:size]
    copies = []
    for k in range(1, size):
        moved = {letter: letters[(j + k) % size] for j, letter in enumerate(letters)}
        copy = dict(row)
        for old, new in moved.items():
            copy[new] = row[old]
        copy["answer"] = moved.get(row["answer"], row["answer"])
        copy["image"] = row["index"]
        copy["index"] = row["index"] + k * offset
        copy["group"] = row["index"]
        copies.append(copy)
    return copies
