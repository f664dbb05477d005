"""Our fine-tuning format (chatml JSON / JSON Lines, read by ``paddlemix.datasets``): the last
answer of each conversation is the reference, earlier turns are the history.

A question whose lines after the first are its options (the seed's ScienceQA style,
``<img>x.png</img>\\nQuestion?\\nopt1\\nopt2\\n``) and whose reference is one of them is scored
as multiple choice (the option the answer names); any other question by exact match after
normalising case, surrounding space and trailing punctuation (as ``eval_with_do_generation``).
"""
from __future__ import annotations

import json
import os
import re
import string
from typing import Any, Dict, List, Optional, Tuple

from ..items import BadRow, EvalItem, ImageRef, RowProblem, image_ref
from .mcq import MIN_OPTIONS
from ...models.internlm_xcomposer2.image_processing import URL_SCHEMES
from ...models.internlm_xcomposer2.processor import IMAGE_PLACEHOLDER

__all__ = ["CATEGORY_KEY", "normalise_answer", "options_of", "read_chatml_items"]

CATEGORY_KEY = "category"  # an optional key of a row: the summary's per-category split
_SOURCE = re.compile(r"^(?P<name>.*?)(?:\[(?P<row>\d+)\]|:(?P<line>\d+))$")


def normalise_answer(text: str) -> str:
    """Case, surrounding whitespace and trailing punctuation do not make an answer wrong."""
    from ...finetune.evaluation import normalise_answer as finetune_normalise

    return finetune_normalise(text)


def options_of(question: str, reference: str) -> Dict[str, str]:
    """The options of a seed-style question (its lines after the first), lettered A, B, ... in order,
    if the reference is one of them; else {} (an open question)."""
    lines = [line.strip() for line in question.replace(IMAGE_PLACEHOLDER, "\n").split("\n") if line.strip()]
    candidates = lines[1:]
    if len(candidates) < MIN_OPTIONS or len(candidates) > len(string.ascii_uppercase):
        return {}
    target = normalise_answer(reference)
    if sum(normalise_answer(c) == target for c in candidates) != 1:
        return {}
    return {string.ascii_uppercase[i]: c for i, c in enumerate(candidates)}


def _raw_rows(path: str) -> Dict[str, Any]:
    """The file's rows keyed as the reader names them (``[i]`` in a JSON list, ``:n`` for line n)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    if not path.lower().endswith(".jsonl"):
        try:
            data = json.loads(text)
            return {f"[{i}]": row for i, row in enumerate(data)} if isinstance(data, list) else {}
        except json.JSONDecodeError:
            pass  # several objects, one per line: JSON Lines, as the reader takes it too
    rows = {}
    for number, line in enumerate(text.split("\n"), start=1):
        try:
            rows[f":{number}"] = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
    return rows


def _categories(path: str, samples: List[Any]) -> Dict[str, str]:
    """``{sample source: category}`` from the rows' optional ``category`` key (the reader drops it)."""
    rows, found = _raw_rows(path), {}
    for sample in samples:
        match = _SOURCE.match(sample.source)
        key = "" if not match else f"[{match['row']}]" if match["row"] else f":{match['line']}"
        row = rows.get(key)
        if isinstance(row, dict) and row.get(CATEGORY_KEY) is not None:
            found[sample.source] = str(row[CATEGORY_KEY])
    return found


def _image_refs(paths: List[str]) -> List[ImageRef]:
    refs = []
    for path in paths:
        if path.lower().startswith(URL_SCHEMES):
            refs.append(ImageRef("url", path))
        elif not os.path.isfile(path):
            raise RowProblem(f"missing image: {path} does not exist")
        else:
            refs.append(image_ref(path, os.path.dirname(path)))
    return refs


def _item(sample: Any, category: str) -> EvalItem:
    """Turns stripped, as the fine-tuning text strips them (the layout the model learned)."""
    *history, (question, reference) = [(q.strip(), a.strip()) for q, a in sample.conversation]
    options = options_of(question, reference)
    answer = next((k for k, v in options.items() if normalise_answer(v) == normalise_answer(reference)), reference)
    return EvalItem(id=sample.id, location=sample.where(), kind="chat", prompt=question, answer=answer,
                    options=options, images=_image_refs(sample.images), category=category,
                    history=history)


def _bad_sample(sample: Any) -> BadRow:
    """The reader's problem text starts with the row's location; keep the two apart."""
    for location in (sample.where(), sample.key):
        if sample.problem.startswith(location + ": "):
            return BadRow(location, sample.problem[len(location) + 2:])
    return BadRow(sample.key, sample.problem)


def read_chatml_items(path: str, image_root: Optional[str] = None) -> Tuple[List[EvalItem], List[BadRow]]:
    """Items of a chatml file; rows ``read_chatml`` finds invalid, or with a missing image, are bad rows."""
    from ...datasets.chatml_reader import read_chatml

    samples = read_chatml(path, image_root=image_root)
    categories = _categories(path, samples)
    items, bad = [], []
    for sample in samples:
        if sample.problem:
            bad.append(_bad_sample(sample))
            continue
        try:
            items.append(_item(sample, categories.get(sample.source, "")))
        except RowProblem as err:
            bad.append(BadRow(sample.where(), str(err)))
    return items, bad
