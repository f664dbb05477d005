"""Paragraph edits of a composed article, as the official demo's edit panel does them.

:func:`edit_article` asks the model (``paragraph_edit``: rewrite, expand, abbreviate, insert a
paragraph before/after, with the demo's prompts and budget) and applies the answer the way the
demo's ``done_edit`` does: the new text becomes one paragraph (line breaks → spaces); an empty
answer deletes the paragraph and its image; an inserted paragraph has no image.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

from .article import Article
from .prompts import EDIT_TYPES
from .steps import StepOutput, edit_paragraph

__all__ = ["apply_edit", "edit_article"]

_INSERTS = ("前插入一段", "后插入一段")


def _kind(edit_type: str) -> str:
    kind = EDIT_TYPES.get(edit_type, edit_type)
    if kind not in EDIT_TYPES.values():
        raise ValueError(f"unknown edit type {edit_type!r}; use one of {', '.join(EDIT_TYPES)}")
    return kind


def apply_edit(article: Article, index: int, edit_type: str, new_text: str) -> None:
    """Put ``new_text`` into ``article`` at paragraph ``index`` (image slots move with their
    paragraphs)."""
    if not 0 <= index < len(article.paragraphs):
        raise ValueError(f"paragraph {index} does not exist (the article has {len(article.paragraphs)})")
    kind = _kind(edit_type)
    if new_text == "":
        del article.paragraphs[index]
        article.slots = [s for s in article.slots if s.paragraph != index]
        _shift(article, after=index, by=-1)
    elif kind in _INSERTS:
        at = index if kind == "前插入一段" else index + 1
        _shift(article, after=at - 1, by=1)
        article.paragraphs.insert(at, re.sub(r"\n+", " ", new_text))
    else:
        article.paragraphs[index] = re.sub(r"\n+", " ", new_text)
    article.text = "\n".join(article.paragraphs)


def _shift(article: Article, after: int, by: int) -> None:
    """Move the images of paragraphs after ``after`` by ``by`` places."""
    for slot in article.slots:
        if slot.paragraph > after:
            slot.paragraph += by


def edit_article(model: Any, tokenizer: Any, article: Article, index: int, edit_type: str, instruction: str = "", *,
                 do_sample: bool = True, with_meta: bool = False,
                 on_text: Optional[Callable[[str], None]] = None) -> StepOutput:
    """Ask the model for the edit of paragraph ``index`` (streamed to ``on_text``) and apply it."""
    if not 0 <= index < len(article.paragraphs):
        raise ValueError(f"paragraph {index} does not exist (the article has {len(article.paragraphs)})")
    paragraphs = article.paragraphs
    before = paragraphs[index - 1] if index > 0 else ""
    after = paragraphs[index + 1] if index + 1 < len(paragraphs) else ""
    output = edit_paragraph(model, tokenizer, edit_type, paragraphs[index], instruction, before, after,
                            do_sample=do_sample, with_meta=with_meta, on_text=on_text)
    apply_edit(article, index, edit_type, output.text)
    return output
