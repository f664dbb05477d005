"""One multiple-choice row (a dict shaped like an MMBench TSV row) → an :class:`EvalItem`.

Shared by the TSV and the ScienceQA readers: checks that the options run A, B, ... without gaps
and that the answer is one of them, and builds the prompt in the chosen style.
"""
from __future__ import annotations

import string
from typing import Any, Dict, Mapping, Optional

from ..items import EvalItem, ImageRef, RowProblem
from ..prompts import is_missing, mcq_prompt, official_options, present_options

__all__ = ["MIN_OPTIONS", "check_options", "item_from_row"]

MIN_OPTIONS = 2


def _text(value: Any) -> Optional[str]:
    return None if is_missing(value) else str(value)


def check_options(options: Mapping[str, str]) -> None:
    """Raise :class:`RowProblem` unless the options are A, B, ... with no letter skipped."""
    letters = list(options)
    expected = list(string.ascii_uppercase[: len(letters)])
    if len(letters) < MIN_OPTIONS:
        have = ", ".join(letters) or "none"
        raise RowProblem(f"options missing: a question needs at least options A and B (has: {have})")
    if letters != expected:
        gap = next(e for e, l in zip(expected, letters) if e != l)
        raise RowProblem(f"options missing: option {gap} is empty but {letters[-1]} is given; options must run "
                         f"A, B, C, ... without gaps")


def item_from_row(row: Mapping[str, Any], item_id: str, location: str, style: str,
                  image: Optional[ImageRef], group: str = "") -> EvalItem:
    """An ``mcq`` item; ``style`` "official" (MMBench script: C/D/E of every present column, NaN as
    ``nan``) or "vlmevalkit" (only options with a value)."""
    question = _text(row.get("question"))
    if question is None or not question.strip():
        raise RowProblem("the question is empty")
    options = present_options(row)
    check_options(options)
    answer = _text(row.get("answer"))
    if answer is None or answer.strip() not in options:
        raise RowProblem(f"answer {answer!r} is not among the options {', '.join(options)}")
    shown: Dict[str, str] = official_options(row) if style == "official" else options
    return EvalItem(
        id=item_id, location=location, kind="mcq", prompt=mcq_prompt(question, shown, row.get("hint")),
        answer=answer.strip(), options=options, images=[image] if image is not None else [],
        category=_text(row.get("category")) or "", l2_category=_text(row.get("l2-category")), group=group,
    )

