"""Generated ids → streamed text: whole characters only, stop strings cut, nothing taken back.

A streamed delta can never be retracted, so text is released only once it is certain to be in
the final answer:

* a decode that ends in U+FFFD is half a multi-byte character: wait for its other bytes (the
  rule of ``stream_chat``);
* the end of the text that could still grow into a stop string (a suffix equal to the start
  of one) is held back until the next token decides;
* the literal end-of-turn token text ``[UNUSED_TOKEN_145]`` is a stop string too, because the
  official response is cut there (``chat`` splits the decoded text on it).

The final content equals what ``chat`` returns for the same ids, cut at the first stop string.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from paddlemix.models.internlm_xcomposer2.tokenizer import IM_END_TOKEN

__all__ = ["IncrementalText", "REPLACEMENT_CHAR"]

REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for an incomplete multi-byte character


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index where the earliest stop string starts, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper start of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class IncrementalText:
    """The text of one row as its ids arrive: :meth:`push` returns the new whole-character text."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.user_stops = list(stops)
        self.stops: List[str] = [*stops, IM_END_TOKEN]
        self.ids: List[int] = []
        self.sent = ""  # text already released
        self.stopped = False  # a stop string was found: the content is final

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one generated id; returns the text that is now certain (maybe empty)."""
        self.ids.append(int(token))
        text = self._decode()
        cut = _first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._release(text[: len(text) - _held_back(text, self.stops)])

    def finish(self) -> Tuple[str, str]:
        """The rest of the text and the whole content, once the row ended (EOS, length, stop)."""
        text = self._decode()
        cut = _first_stop(text, self.stops)
        content = text if cut is None else text[:cut]
        if not content.startswith(self.sent):  # cannot happen for prefix-stable decoding; never send a wrong text
            raise RuntimeError(f"decoded text changed under the stream: sent {self.sent!r}, final {content!r}")
        return self._release(content), content

    def _release(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
