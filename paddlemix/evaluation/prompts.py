"""The official evaluation prompts of InternLM-XComposer2, as plain strings.

Two references exist and they differ in one detail (see the README section "Evaluate"):

* the official IXC2 MMBench script (``evaluation/mmbench/utils.py``) writes an option for every
  *column* ``C``/``D``/``E`` the TSV has, so an empty cell (pandas NaN) shows up as ``C. nan``;
* VLMEvalKit's ``XComposer2.build_mcqa`` (used for MMBench, ScienceQA, SEED, AI2D, ...) writes
  only the options that have a value, any letter ``A``-``Z``.

Both put the image *before* the text (right after BOS), use no system prompt and end the prompt
with ``The answer is`` (no trailing space)::

    [BOS] [image embeddings] [UNUSED_TOKEN_146]user\\nQuestion: {q}\\nContext: {hint or N/A}\\n
    Options: A. {A} B. {B} ...[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\nThe answer is
"""
from __future__ import annotations

import math
import string
from typing import Any, Dict, Mapping, Optional

from ..models.internlm_xcomposer2.tokenizer import IM_END_TOKEN, IM_START_TOKEN

__all__ = [
    "ANSWER_PREFIX",
    "NO_CONTEXT",
    "OFFICIAL_OPTION_COLUMNS",
    "PROMPT_STYLES",
    "USER_PREFIX",
    "is_missing",
    "mcq_prompt",
    "official_options",
    "present_options",
]

USER_PREFIX = f"{IM_START_TOKEN}user\n"
ASSISTANT_PREFIX = f"{IM_END_TOKEN}\n{IM_START_TOKEN}assistant\n"
ANSWER_PREFIX = f"{ASSISTANT_PREFIX}The answer is"
NO_CONTEXT = "N/A"  # what both references write for a missing hint
# The official MMBench script always writes A and B, then C, D, E when the column exists.
OFFICIAL_OPTION_COLUMNS = ("A", "B", "C", "D", "E")
PROMPT_STYLES = ("official", "vlmevalkit")


def is_missing(value: Any) -> bool:
    """``pd.isna`` for one cell: None or a float NaN (what pandas reads from an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def present_options(row: Mapping[str, Any]) -> Dict[str, str]:
    """VLMEvalKit's option set: every letter ``A``-``Z`` the row has with a value, in order."""
    return {c: str(row[c]) for c in string.ascii_uppercase if c in row and not is_missing(row[c])}


def official_options(row: Mapping[str, Any]) -> Dict[str, str]:
    """The official MMBench script's option set: A and B always, then C, D, E if the *column* exists,
    whatever its value; a NaN is written the way an f-string writes it (``nan``)."""
    options = {c: f"{row.get(c)}" for c in OFFICIAL_OPTION_COLUMNS[:2]}
    options.update({c: f"{row[c]}" for c in OFFICIAL_OPTION_COLUMNS[2:] if c in row})
    return options


def _options_text(options: Mapping[str, str]) -> str:
    return "".join(f"{key}. {text} " for key, text in options.items()).strip()


def mcq_prompt(question: str, options: Mapping[str, str], hint: Optional[str] = None) -> str:
    """The multiple-choice prompt of both references (without the image, which precedes it).

    ``question`` and ``hint`` are inserted raw (newlines kept); ``hint`` None or NaN → ``N/A``.
    """
    context = NO_CONTEXT if is_missing(hint) else str(hint)
    middle = f"Question: {question}\nContext: {context}\nOptions: {_options_text(options)}"
    return USER_PREFIX + middle + ANSWER_PREFIX

