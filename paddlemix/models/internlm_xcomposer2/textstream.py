"""Generated ids → streamed text: whole characters only, stop strings cut, nothing taken back.

A streamed delta can never be retracted, so text is released only once it is certain to be in
the final answer:

* a decode that ends in U+FFFD is half a multi-byte character: wait for its other bytes (the
  rule of ``stream_chat``);
* the end of the text that could still grow into a stop string (a suffix equal to the start
  of one) is held back until the next token decides; so is an end that the tokenizer's
  clean-up could still rewrite (``" ."`` → ``"."``, ``" n't"`` → ``"n't"``, ...: the last few
  characters from a space or apostrophe on), since decoding one more token may change it;
* the literal end-of-turn token text ``[UNUSED_TOKEN_145]`` is a stop string too, because the
  official response is cut there (``chat`` splits the decoded text on it).

The final content is ``tokenizer.decode`` of all ids cut at the first stop string: exactly what
``chat`` returns for them (cut). While streaming, the text is rebuilt from per-token pieces
cached as they arrive (``convert_tokens_to_string``, what ``decode`` runs after looking every
id up again: PaddleNLP's ``decode`` costs ~20 µs per id and call, which would make a long answer
quadratic). Used by the server's streams and the composition's article stream
(``skip_special_tokens=False``: its text is the plain ``decode``, which equals the cached
pieces joined, special pieces included; tested). There, a special token in mid-text may add a
space to text already shown (see :meth:`IncrementalText.finish`): the stream is for display,
the returned content is always the decode.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

from .tokenizer import IM_END_TOKEN

logger = logging.getLogger(__name__)

__all__ = ["CLEANUP_PATTERNS", "IncrementalText", "REPLACEMENT_CHAR"]

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for an incomplete multi-byte character
# What ``clean_up_tokenization`` (always applied by this tokenizer's ``convert_tokens_to_string``)
# rewrites: it deletes the space before these. Pinned by a test.
CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
# The rewrites run one after another and feed each other (" n ' t" → " n't" → "n't"), and one more
# token can complete or pre-empt a pattern: a space or an apostrophe this close to the end of the
# text may still be deleted or moved, so the text from the first of them in this window waits.
CLEANUP_WINDOW = 2 * max(len(p) for p in CLEANUP_PATTERNS)
CLEANUP_CHARS = (" ", "'")


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest stop string starts, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _cleanup_held_back(text: str) -> int:
    """Length of the end of ``text`` the tokenizer's clean-up may still rewrite (see above)."""
    tail = text[-CLEANUP_WINDOW:]
    starts = [i for i in (tail.find(c) for c in CLEANUP_CHARS) if i >= 0]
    return len(tail) - min(starts) if starts else 0


def _held_back(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of some pattern."""
    longest = 0
    for pattern in patterns:
        for k in range(min(len(pattern) - 1, len(text)), longest, -1):
            if text.endswith(pattern[:k]):
                longest = k
                break
    return longest


class IncrementalText:
    """The text of one row as its ids arrive: :meth:`push` returns the new whole-character text."""

    def __init__(self, tokenizer, stops: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stops: List[str] = [*stops, IM_END_TOKEN]
        self.skip_special_tokens = skip_special_tokens
        self.special_ids = set(tokenizer.all_special_ids) if skip_special_tokens else set()  # what decode drops
        self.ids: List[int] = []
        self.pieces: List[str] = []
        self.sent = ""  # text already released
        self.stopped = False  # a stop string was found: the content is final

    def _text(self) -> str:
        return self.tokenizer.convert_tokens_to_string(self.pieces) if self.pieces else ""

    def push(self, token: int) -> str:
        """Add one generated id; returns the text that is now certain (maybe empty)."""
        token = int(token)
        self.ids.append(token)
        if token not in self.special_ids:
            self.pieces.append(self.tokenizer.convert_ids_to_tokens(token))
        text = self._text()
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        held = max(_held_back(text, self.stops), _cleanup_held_back(text))
        return self._release(text[: len(text) - held])

    def finish(self) -> Tuple[str, str]:
        """The rest of the text and the whole content, once the row ended (EOS, length, stop)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        cut = _first_stop(text, self.stops)
        content = text if cut is None else text[:cut]
        if not content.startswith(self.sent):
            # Without special pieces the hold-back rules make this impossible (tested on random
            # ids). With them kept (skip_special_tokens=False), a special token makes the
            # official convert_tokens_to_string put a space *before* the text run it ends, so
            # text already shown can gain a space: the content stays the decode, the stream ends.
            logger.warning("the streamed text differs from the final decode (%d characters shown); "
                           "the final text is the decode", len(self.sent))
            return "", content
        return self._release(content), content

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
