"""From a model's raw answer to the option it chose.

``can_infer`` reproduces VLMEvalKit's matcher (``vlmeval/utils/matching_util.py``, the long-standing
version of the IXC2 era): first an option *letter* standing alone among the words, then, failing
that, the one option whose *text* the answer contains. VLMEvalKit falls back to a GPT judge after
that; here (as with its ``exact_matching`` policy) an answer that matches nothing is wrong.

``official_letter`` is the official IXC2 MMBench script's rule: the first capital ``A``-``D``
anywhere in the answer.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

__all__ = [
    "EXTRACTORS",
    "REFUSAL_CHOICE",
    "can_infer",
    "can_infer_option",
    "can_infer_text",
    "match_option_text",
    "official_letter",
]

REFUSAL_CHOICE = "Z"  # VLMEvalKit's "the model declined / no option": never a correct answer
# Strings VLMEvalKit takes as a refusal to answer (plain, case-sensitive substrings).
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})  # these 13 characters count as spaces
_OFFICIAL_LETTER = re.compile(r"[A-D]")
EXTRACTORS = ("vlmevalkit", "official")


def can_infer_option(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """The option letter that stands alone in ``answer`` (words split at whitespace and ``.()[],:;!*#{}``),
    if exactly one of the option letters does; ``Z`` for a refusal. None otherwise."""
    if _API_FAILURE in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return REFUSAL_CHOICE
    words = answer.translate(_SEPARATORS).split()
    present = [letter for letter in choices if letter in words]
    if len(present) == 1:
        return present[0]
    if not present and REFUSAL_CHOICE in words:
        return REFUSAL_CHOICE
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """The one option whose text (lower-cased) occurs in the lower-cased ``answer``; None if none or several do."""
    lowered = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def can_infer(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """VLMEvalKit's ``can_infer``: a standalone option letter first, else a unique option text."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def official_letter(answer: str, choices: Mapping[str, str]) -> Optional[str]:
    """The official IXC2 MMBench rule: the first ``A``-``D`` anywhere (``choices`` unused). The
    script's fallback ``E`` for "no letter" is None here, since E can be a real option."""
    found = _OFFICIAL_LETTER.search(answer)
    return found.group() if found else None


def match_option_text(answer: str, choices: Mapping[str, str], normalise) -> Optional[str]:
    """For options shown without letters (our chatml rows): the option equal to the answer after
    ``normalise``, else the one option whose text the answer contains."""
    target = normalise(answer)
    exact = [letter for letter, text in choices.items() if normalise(text) == target]
    if len(exact) == 1:
        return exact[0]
    return can_infer_text(answer, choices)
