"""ScienceQA-style rows with options, in JSON or JSON Lines.

Accepted shapes: ScienceQA's own ``problems.json`` (an object of ``pid → problem``, images at
``images/{split}/{pid}/image.png`` or ``{split}/{pid}/image.png`` next to it), or a list / JSON Lines
of objects with ``question``, ``choices`` (a list, or columns ``A``, ``B``, ...), ``answer`` (the
0-based index into the choices as ScienceQA stores it, the letter, or the option text), optional
``hint``/``context``, ``image`` (path, URL, base64 or absent for a text-only question), ``category``
and ``subject``. The prompt is VLMEvalKit's (``build_mcqa``): the hint as the context, no lecture.
"""
from __future__ import annotations

import json
import os
import string
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..items import BadRow, EvalItem, ImageRef, RowProblem, image_ref
from ..prompts import is_missing
from .mcq import item_from_row

__all__ = ["read_scienceqa_json"]

ID_KEYS = ("id", "pid", "index", "question_id")


def _entries(path: str) -> Iterator[Tuple[str, str, Any]]:
    """``(default id, location, row)`` of every row of a JSON object/list or JSON Lines file."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            raise ValueError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
        data = None
    if isinstance(data, dict):
        for pid, row in data.items():
            yield str(pid), f"{path}, problem {pid!r}", row
    elif isinstance(data, list):
        for i, row in enumerate(data):
            yield str(i), f"{path}, row {i} (0-based)", row
    elif data is None:  # JSON Lines
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    row = RowProblem(f"is not valid JSON ({err.msg} at column {err.colno})")
                yield str(number), f"{path}, line {number}", row
    else:
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a list or an object of problems")


def _choices(row: Dict[str, Any]) -> Dict[str, str]:
    choices = row.get("choices")
    if isinstance(choices, list):
        if len(choices) > len(string.ascii_uppercase):
            raise RowProblem(f"{len(choices)} choices; at most {len(string.ascii_uppercase)} can be lettered")
        return {string.ascii_uppercase[i]: str(c) for i, c in enumerate(choices)}
    return {c: str(row[c]) for c in string.ascii_uppercase if c in row and not is_missing(row[c])}


def _answer_letter(answer: Any, options: Dict[str, str]) -> Optional[str]:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return string.ascii_uppercase[answer] if 0 <= answer < len(options) else None
    if isinstance(answer, str):
        if answer.strip() in options:
            return answer.strip()
        matches = [k for k, text in options.items() if text.strip() == answer.strip()]
        return matches[0] if len(matches) == 1 else None
    return None


def _image(row: Dict[str, Any], pid: str, base_dir: str) -> Optional[ImageRef]:
    value = row.get("image")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None  # a text-only question
    if not isinstance(value, str):
        raise RowProblem(f"image is a {type(value).__name__}; give a path, URL or base64 string")
    split = str(row.get("split", ""))
    candidates = (value, os.path.join("images", split, pid, value), os.path.join(split, pid, value))
    for candidate in candidates:
        if os.path.isfile(os.path.join(base_dir, candidate)):
            return image_ref(candidate, base_dir)
    try:
        return image_ref(value, base_dir)  # a URL or base64
    except RowProblem as err:
        looked = ", ".join(os.path.join(base_dir, c) for c in candidates)
        raise RowProblem(f"missing image: {value!r} not found (looked for {looked}); fix the path or pass "
                         "--image_root") from err


def _as_mcq_row(row: Any, pid: str, base_dir: str) -> Tuple[Dict[str, Any], Optional[ImageRef]]:
    if isinstance(row, RowProblem):
        raise row
    if not isinstance(row, dict):
        raise RowProblem(f"is a JSON {type(row).__name__}, not an object with question, choices and answer")
    options = _choices(row)
    answer = row.get("answer")
    letter = _answer_letter(answer, options) if options else None
    if options and letter is None:
        raise RowProblem(f"answer {answer!r} is not among the options {', '.join(options)}")
    hint = row.get("hint", row.get("context"))
    table = {"question": row.get("question"), "hint": hint if hint else None, "answer": letter, **options,
             "category": row.get("category") or row.get("subject"),
             "l2-category": row.get("subject") if row.get("category") else None}
    return table, _image(row, pid, base_dir)


def read_scienceqa_json(path: str, image_root: Optional[str] = None,
                        split: Optional[str] = None) -> Tuple[List[EvalItem], List[BadRow], int]:
    """``(items, bad rows, rows of other splits left out)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist (working directory {os.getcwd()!r})")
    base_dir = os.path.abspath(os.path.dirname(path) if image_root is None else os.path.expanduser(image_root))
    items, bad, other_split, seen = [], [], 0, {}
    for default_id, where, row in _entries(path):
        if split is not None and isinstance(row, dict) and str(row.get("split")) != split:
            other_split += 1
            continue
        item_id = next((str(row[k]) for k in ID_KEYS if isinstance(row, dict) and row.get(k) is not None),
                       default_id)
        try:
            if item_id in seen:
                raise RowProblem(f"duplicate id {item_id!r}, already used by {seen[item_id]}")
            seen[item_id] = where
            table, image = _as_mcq_row(row, item_id, base_dir)
            items.append(item_from_row(table, item_id, where, "vlmevalkit", image))
        except RowProblem as err:
            bad.append(BadRow(where, str(err)))
    return items, bad, other_split
