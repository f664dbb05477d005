"""Reading the model's answers: paragraphs, insertion places, captions and the chosen candidate.

Each reader does what the official demo does with a well-formed answer. Where the demo crashes
or silently misreads a malformed one, the reader says what it did (``problems``) instead, so the
pipeline can log it and record it in the article.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from paddlemix.models.internlm_xcomposer2.tokenizer import IM_END_TOKEN, IM_START_TOKEN

from .prompts import LOCATION_ANSWER_PREFIX

__all__ = ["split_paragraphs", "Locations", "parse_locations", "spread_places", "parse_caption",
           "parse_selection", "strip_chat_markers", "caption_table"]

_BLANK_RUNS = re.compile(r"(\n\s*)+")  # the demo's paragraph rule: blank lines and line-leading space go
_SEG_TAG = re.compile(r"<Seg[0-9]*>")  # ``self.r2``: the demo's location pattern


def split_paragraphs(text: str) -> List[str]:
    """The demo's paragraphs: ``re.sub(r'(\\n\\s*)+', '\\n', text.strip()).split('\\n')`` (every
    non-empty line, titles and list items included). An empty article has no paragraph (the
    demo would keep one empty string)."""
    text = text.strip()
    return _BLANK_RUNS.sub("\n", text).split("\n") if text else []


def strip_chat_markers(text: str) -> str:
    """The demo's clean-up of a non-streamed answer: the chat markers are ordinary pieces, not
    special tokens, so ``skip_special_tokens`` keeps them and it removes them by name."""
    return text.replace(IM_END_TOKEN, "").replace(IM_START_TOKEN, "")


@dataclass
class Locations:
    """Places read from a location answer, in the model's order (duplicates and out-of-range
    numbers kept, as the demo keeps them); ``problems`` lists what could not be read."""

    places: List[int]
    answer: str
    problems: List[str] = field(default_factory=list)


def parse_locations(continuation: str) -> Locations:
    """``generate_loc``'s reading: every ``<SegN>`` in ``适合插入图像的行是`` + the model's
    continuation, anywhere (also after the answer's end marker). A ``<Seg>`` without a number
    crashes the demo (``int('')``); here it is skipped and reported."""
    answer = LOCATION_ANSWER_PREFIX + continuation
    places, problems = [], []
    for tag in _SEG_TAG.findall(answer):
        number = tag[len("<Seg"):-1]
        if number:
            places.append(int(number))
        else:
            problems.append(f"a {tag} tag without a paragraph number was ignored")
    if not places:
        problems.append("the answer names no paragraph (<SegN>)")
    return Locations(places, answer, problems)


def spread_places(num_paragraphs: int, count: int) -> List[int]:
    """``count`` places spread evenly over ``num_paragraphs``, the first after paragraph 0: our
    fallback when a location answer for a requested number of images names no valid place."""
    if num_paragraphs <= 0 or count <= 0:
        return []
    return sorted({(i * num_paragraphs) // count for i in range(min(count, num_paragraphs))})


def parse_caption(continuation: str) -> str:
    """``generate_cap``'s reading: the text up to the first ASCII ``"`` (the quote the forced
    ``标题是"`` opened), stripped. Without a closing quote, the whole continuation."""
    return continuation.split('"')[0].strip()


def caption_table(places: Sequence[int], captions: Sequence[str]) -> Dict[int, str]:
    """The demo's ``caps`` dict: one caption per place, in first-seen order; a repeated place
    keeps its *last* caption (a later assignment overwrites the value, not the order)."""
    table: Dict[int, str] = {}
    for place, caption in zip(places, captions):
        table[place] = caption
    return table


def parse_selection(answer_ids_text: str, num_candidates: int) -> Tuple[Optional[int], str]:
    """The chosen candidate from the decoded selection answer (the demo decodes
    ``outputs[0][2:]``: its output starts with BOS, and the first generated token, normally the
    separator before the letter, is dropped too). The first character after leading spaces is
    the letter; anything else (no text, not a letter of a shown candidate) returns ``None``:
    the demo then falls back to candidate A."""
    text = answer_ids_text.lstrip()
    if not text:
        return None, "the answer is empty"
    index = ord(text[0]) - ord("A")
    if 0 <= index < num_candidates:
        return index, ""
    last = chr(ord("A") + num_candidates - 1)
    return None, f"the answer {text[:20]!r} does not start with a candidate letter A-{last}"
