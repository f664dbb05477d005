"""Reading ChatML fine-tuning files into :class:`Sample` s (step 1 of read → validate → serve).

PaddleMIX ``[[question, answer], ...]`` rows with ``<img>path</img>`` tags, or the official
``from``/``value`` rows with ``<ImageHere>`` + ``image``; JSON or JSON Lines. A malformed row becomes
a sample carrying a precise ``problem``, so one policy switch (``skip_invalid_samples``) governs
every kind of bad data.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union


from ..models.internlm_xcomposer2.image_processing import URL_SCHEMES
from ..models.internlm_xcomposer2.processor import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "Sample", "read_chatml"]

IMG_OPEN, IMG_CLOSE = "<img>", "</img>"
_IMG_TAG = re.compile(r"</?img>")  # scanning tag by tag = non-greedy matching, plus nesting errors
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
JSONL_SUFFIX = ".jsonl"
SUMMARY_MAX_PROBLEMS = 10
MAX_SHOWN_CHARS = 80  # how much of an offending value an error message quotes
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
PathList = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class DatasetError(ValueError):
    """Unusable training data. The message names the file, the row (0-based) or JSONL line, the
    sample id when known, what is wrong and what to do: data is fixed by people, not by code."""


class _RowError(Exception):
    """A row-level problem; :func:`read_chatml` prefixes the location before reporting it."""


@dataclass
class Sample:
    """One conversation: ``images[k]`` fills the k-th ``<ImageHere>`` of ``conversation``."""

    id: str
    source: str  # "train.json[12]" (row 12) or "train.jsonl:13" (line 13)
    conversation: List[Tuple[str, str]]
    images: List[str]  # absolute local paths or http(s) URLs
    location: str = field(default="", compare=False)  # "data/train.json, row 12 (0-based)"
    problem: Optional[str] = None  # why read_chatml found the row unusable (the message names the row)

    @property
    def key(self) -> str:
        """Unique per file row (the path as given + row/line): the key of ``ValidationReport.layouts``."""
        return self.location or self.source

    def where(self) -> str:
        return f"{self.key}, id {self.id!r}"


def _json_type(value: Any) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


# --- files -> rows ---------------------------------------------------------------------------
def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as err:
        raise DatasetError(f"data file {path!r} does not exist (working directory {os.getcwd()!r}); "
                           "check the path.") from err
    except OSError as err:
        raise DatasetError(f"data file {path!r} cannot be read ({err.strerror}); check the path and its "
                           "permissions.") from err
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"data file {path!r} is not UTF-8: byte 0x{raw[err.start]:02x} at byte offset "
                           f"{err.start} cannot be decoded; re-save the file as UTF-8.") from err


def _jsonl_rows(path: str, text: str) -> List[Tuple[str, str, Any]]:
    rows, name = [], os.path.basename(path)
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may be in a string
        if line.strip():
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError as err:
                row = _RowError(f"is not valid JSON: {err.msg} at column {err.colno}; fix the syntax (JSON "
                                "Lines: one complete JSON object per line)")
            rows.append((f"{name}:{number}", f"{path}, line {number}", row))
    return rows


def _first_line_is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(next(line for line in text.split("\n") if line.strip())), dict)
    except (json.JSONDecodeError, StopIteration):
        return False


def _file_rows(path: str) -> List[Tuple[str, str, Any]]:
    """``(source, location, row)`` for every row of a JSON list or JSON Lines file."""
    text = _read_text(path)
    if path.lower().endswith(JSONL_SUFFIX):
        return _jsonl_rows(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and _first_line_is_object(text):
            return _jsonl_rows(path, text)  # several objects, one per line: JSON Lines without the suffix
        raise DatasetError(f"data file {path!r} is not valid JSON: {err.msg} at line {err.lineno}, column "
                           f"{err.colno}; fix the syntax.") from err
    if not isinstance(data, list):
        raise DatasetError(f"data file {path!r} holds a JSON {_json_type(data)}, not a list of samples; wrap "
                           "the samples in [...] or write one JSON object per line (JSON Lines, .jsonl).")
    name = os.path.basename(path)
    return [(f"{name}[{i}]", f"{path}, row {i} (0-based)", row) for i, row in enumerate(data)]


# --- rows -> samples -------------------------------------------------------------------------
def _resolve(path: str, base_dir: str) -> str:
    if path.lower().startswith(URL_SCHEMES):
        return path
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _extract_images(question: str, turn: int) -> Tuple[str, List[str]]:
    """Replace every ``<img>path</img>`` (non-greedy) with ``<ImageHere>``; return the paths."""
    parts, paths, pos, opened = [], [], 0, None
    for tag in _IMG_TAG.finditer(question):
        if tag.group() == IMG_OPEN:
            if opened is not None:
                raise _RowError(f"question of turn {turn} has nested {IMG_OPEN} tags (a second {IMG_OPEN} at "
                                f"character {tag.start()} before {IMG_CLOSE}); write one <img>path</img> per image")
            opened = tag
            continue
        if opened is None:
            raise _RowError(f"question of turn {turn} has {IMG_CLOSE} at character {tag.start()} without an "
                            f"opening {IMG_OPEN}; write images as <img>path</img>")
        path = question[opened.end() : tag.start()].strip()
        if not path:
            raise _RowError(f"question of turn {turn} has an empty {IMG_OPEN}{IMG_CLOSE} at character "
                            f"{opened.start()}; put the image path or URL inside, or remove the tag")
        parts.append(question[pos : opened.start()] + IMAGE_PLACEHOLDER)
        paths.append(path)
        pos, opened = tag.end(), None
    if opened is not None:
        raise _RowError(f"question of turn {turn} has {IMG_OPEN} at character {opened.start()} without a "
                        f"closing {IMG_CLOSE}; close the tag")
    return "".join(parts) + question[pos:], paths


def _seed_turns(turns: List[Any]) -> Tuple[List[Tuple[str, str]], List[str]]:
    conversation, images = [], []
    for k, turn in enumerate(turns):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise _RowError(f"turn {k} (0-based) is {_shown(turn)}, not a [question, answer] pair of strings")
        for role, text in zip(("question", "answer"), turn):
            if IMAGE_PLACEHOLDER in text:
                raise _RowError(f"the {role} of turn {k} contains a literal {IMAGE_PLACEHOLDER}, which would be "
                                f"taken for an image slot; mark images as <img>path</img> and rephrase the text")
        question, paths = _extract_images(turn[0], k)
        if not question.strip():  # an image-only question ("<img>a.png</img>") is fine
            raise _RowError(f"the question of turn {k} is empty; write the question or remove the turn")
        if not turn[1].strip():
            raise _RowError(f"the answer of turn {k} is empty; write the answer or remove the turn")
        conversation.append((question, turn[1]))
        images += paths
    return conversation, images


def _official_images(row: Dict[str, Any]) -> List[str]:
    images = row.get("image", row.get("images", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p.strip() for p in images):
        raise _RowError(f'"image" is {_shown(images)}; it must be a list of non-empty image paths or URLs')
    return [p.strip() for p in images]


def _official_turns(row: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], List[str]]:
    values = []
    for k, turn in enumerate(row["conversations"]):
        if not (isinstance(turn, dict) and "from" in turn and isinstance(turn.get("value"), str)):
            raise _RowError(f'turn {k} (0-based) is {_shown(turn)}, not an object with "from" and a string "value"')
        role, expected = ROLES.get(str(turn["from"]).lower()), ("user", "assistant")[k % 2]
        if role is None:
            raise _RowError(f'turn {k} has unknown role "from": {_shown(turn["from"])}; use "user"/"human" or '
                            '"assistant"/"gpt"')
        if role != expected:
            raise _RowError(f"turn {k} is from the {role} but should be from the {expected}; turns must "
                            "alternate user, assistant, user, ... starting with the user")
        if not turn["value"].strip():  # an image-only question ("<ImageHere>") is fine
            raise _RowError(f"turn {k} ({role}) is empty; write its text or remove the turn")
        values.append(turn["value"])
    if len(values) % 2:
        raise _RowError(f"the last turn ({len(values) - 1}) is a user turn without an answer; add the assistant "
                        "answer or remove the turn")
    images, tags = _official_images(row), sum(v.count(IMAGE_PLACEHOLDER) for v in values)
    if tags != len(images):
        raise _RowError(f'the conversation has {tags} {IMAGE_PLACEHOLDER} tag(s) but "image" lists {len(images)} '
                        f"path(s); put one {IMAGE_PLACEHOLDER} where each image goes, in the order of \"image\"")
    return list(zip(values[0::2], values[1::2])), images


def _parse_row(row: Any, sample_id: str, source: str, location: str, base_dir: str) -> Sample:
    if isinstance(row, _RowError):
        raise row
    if not isinstance(row, dict):
        raise _RowError(f'is a JSON {_json_type(row)}, not an object {{"id": ..., "conversations": [...]}}')
    if "conversations" not in row:
        raise _RowError(f'has no "conversations" (keys: {sorted(row)}); add the list of turns')
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _RowError(f'"conversations" is {_shown(turns)}; it must be a non-empty list of turns')
    conversation, images = _official_turns(row) if isinstance(turns[0], dict) else _seed_turns(turns)
    images = [_resolve(p, base_dir) for p in images]
    return Sample(sample_id, source, conversation, images, location)


def _read_file(path: str, base_dir: str, seen: Dict[str, str]) -> List[Sample]:
    """The samples of one file; ``seen`` maps each id met so far (in any file) to its location."""
    samples = []
    for source, location, row in _file_rows(path):
        has_id = isinstance(row, dict) and row.get("id") is not None
        sample_id = str(row["id"]) if has_id else source
        try:
            if has_id and sample_id in seen:
                raise _RowError(f"duplicate id, already used by {seen[sample_id]}; ids must be unique, rename one "
                                "of the two")
            samples.append(_parse_row(row, sample_id, source, location, base_dir))
        except _RowError as err:
            prefix = f"{location}, id {sample_id!r}" if has_id else location
            samples.append(Sample(sample_id, source, [], [], location, problem=f"{prefix}: {err}"))
        if has_id:
            seen.setdefault(sample_id, location)
    return samples


def read_chatml(data_files: PathList, image_root: Optional[str] = None, strict: bool = False) -> List[Sample]:
    """Parse ``data_files`` (one path or several) into samples, in file and row order.

    Relative image paths resolve against ``image_root``, else the data file's folder. File-level
    problems (missing, not UTF-8, not JSON, not a list) raise :class:`DatasetError`. An invalid row
    (or a later duplicate of an id) is returned as a sample whose ``problem`` says what is wrong;
    :func:`validate` reports it and :func:`apply_policy` raises or drops it. ``strict`` raises at once,
    listing every invalid row.
    """
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise DatasetError("no data file was given; pass the path of a .json or .jsonl file (or a list of them)")
    samples: List[Sample] = []
    seen: Dict[str, str] = {}
    for path in map(os.fspath, files):
        base_dir = os.path.abspath(os.path.dirname(path) if image_root is None else os.path.expanduser(image_root))
        samples += _read_file(path, base_dir, seen)
    errors = [sample.problem for sample in samples if sample.problem]
    if errors and strict:
        more = len(errors) - SUMMARY_MAX_PROBLEMS
        raise DatasetError(f"{len(errors)} invalid row(s) in the training data:\n  " + "\n  ".join(
            errors[:SUMMARY_MAX_PROBLEMS]) + (f"\n  ... and {more} more" if more > 0 else ""))
    if errors:
        logger.warning("%d of %d row(s) are invalid; validate() reports them, e.g. %s", len(errors), len(samples),
                       errors[0])
    return samples


