"""Raw answer → the extracted choice and whether it is right, for each kind of item."""
from __future__ import annotations

from typing import Optional, Tuple

from .extraction import EXTRACTORS, can_infer, match_option_text, official_letter
from .items import EvalItem
from .readers.chatml import normalise_answer

__all__ = ["score"]


def score(item: EvalItem, raw: str, extract: str = "vlmevalkit") -> Tuple[Optional[str], bool]:
    """``(choice, correct)``. Benchmark rows: the letter ``extract`` finds (VLMEvalKit's ``can_infer``,
    or the official script's first A-D). Chat rows with options: the option the answer names. Open
    chat rows: no choice; right if equal to the reference after :func:`normalise_answer`."""
    if extract not in EXTRACTORS:
        raise ValueError(f"extract must be one of {EXTRACTORS}, got {extract!r}")
    if item.kind == "mcq":
        choice = (can_infer if extract == "vlmevalkit" else official_letter)(raw, item.options)
        return choice, choice == item.answer
    if item.options:
        choice = match_option_text(raw, item.options, normalise_answer)
        return choice, choice == item.answer
    return None, normalise_answer(raw) == normalise_answer(item.answer)
