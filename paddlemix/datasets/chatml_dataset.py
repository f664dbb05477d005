"""ChatML fine-tuning data for InternLM-XComposer2: read, validate, serve.

Three steps, so that bad data fails in seconds, before training, instead of hours into it:

1. :func:`read_chatml` parses the files (PaddleMIX ``[[question, answer], ...]`` rows with
   ``<img>path</img>`` tags, or the official ``from``/``value`` rows with ``<ImageHere>`` + ``image``;
   JSON or JSON Lines) into :class:`Sample` s; a malformed row becomes a sample carrying a precise
   ``problem``, so that one policy switch (``skip_invalid_samples``) governs every kind of bad data.
2. :func:`validate` builds every training layout (kept in ``report.layouts``, so nothing is tokenized
   twice) and opens every distinct image once; :func:`apply_policy` raises or drops invalid samples.
3. :class:`ChatMLDataset` serves NumPy arrays; images are only decoded in ``__getitem__``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple, Union

import numpy as np
import paddle

from ..models.internlm_xcomposer2.image_processing import URL_SCHEMES, ImageLoadError, load_image
from ..models.internlm_xcomposer2.processor import IMAGE_PLACEHOLDER, IMAGE_SLOT, InternLMXComposer2Processor, Layout
from .collator import SKIPPED_KEY

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "Sample", "Issue", "ValidationReport", "read_chatml", "validate", "apply_policy",
           "ChatMLDataset"]

IMG_OPEN, IMG_CLOSE = "<img>", "</img>"
_IMG_TAG = re.compile(r"</?img>")  # scanning tag by tag = non-greedy matching, plus nesting errors
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
JSONL_SUFFIX = ".jsonl"
ON_IMAGE_ERROR = ("raise", "skip")
DEFAULT_URL_TIMEOUT = 5.0  # seconds: validation only needs to know the URL answers with an image
IMAGE_CHECK_WORKERS = 8  # image checks are mostly I/O (disk, network): a few threads overlap them
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


# --- validation ------------------------------------------------------------------------------
class Issue(NamedTuple):
    source: str
    id: str
    message: str  # self-contained: names the file, row/line and id


@dataclass
class ValidationReport:
    """What :func:`validate` found. Problems make a sample unusable; warnings (e.g. a cut answer) do not."""

    num_samples: int = 0
    num_images: int = 0  # image references; each distinct path/URL is checked once
    problems: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)
    supervised_tokens: List[int] = field(default_factory=list)  # per valid sample
    invalid: Set[int] = field(default_factory=set)  # indices into the validated sample list
    layouts: Dict[str, Layout] = field(default_factory=dict, repr=False)  # Sample.key -> layout, for the dataset

    @property
    def num_valid(self) -> int:
        return self.num_samples - len(self.invalid)

    @property
    def total_supervised(self) -> int:
        return sum(self.supervised_tokens)

    @property
    def min_supervised(self) -> int:
        return min(self.supervised_tokens, default=0)

    @property
    def mean_supervised(self) -> float:
        return self.total_supervised / max(len(self.supervised_tokens), 1)

    def summary(self, max_problems: int = SUMMARY_MAX_PROBLEMS) -> str:
        lines = [f"{self.num_samples} sample(s): {self.num_valid} valid, {len(self.invalid)} invalid "
                 f"({len(self.problems)} problem(s)), {len(self.warnings)} warning(s), {self.num_images} image(s)",
                 f"supervised tokens of the valid samples: total {self.total_supervised}, min "
                 f"{self.min_supervised}, mean {self.mean_supervised:.1f}"]
        lines += [f"  problem: {issue.message}" for issue in self.problems[:max_problems]]
        if 0 < max_problems < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - max_problems} more problem(s)")
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DatasetError(self.summary())


def _check_images(samples: Sequence[Sample], timeout: float, max_pixels: int) -> Dict[str, Optional[str]]:
    """Load every distinct image once (URLs too); map it to its error message, or None if usable."""
    def check(path: str) -> Optional[str]:
        try:
            load_image(path, timeout=timeout, max_pixels=max_pixels)
            return None
        except ImageLoadError as err:
            return str(err)

    unique = list(dict.fromkeys(path for sample in samples for path in sample.images))
    with ThreadPoolExecutor(IMAGE_CHECK_WORKERS) as pool:
        return dict(zip(unique, pool.map(check, unique)))


def _layout_problem(sample: Sample, processor: InternLMXComposer2Processor, report: ValidationReport) -> Optional[str]:
    """Build and keep the sample's layout; a problem if nothing is left to learn, a warning if cut."""
    try:
        layout = processor.training_layout(sample.conversation, len(sample.images))
    except ValueError as err:
        return f"cannot build its training sequence ({err}); fix the conversation"
    report.layouts[sample.key] = layout
    notes = "; ".join(layout.notes)
    if layout.num_supervised == 0:
        return (f"no answer token is left to learn after truncation to max_length={processor.max_length} "
                f"({notes}); shorten the conversation or raise max_length")
    if layout.truncated:
        report.warnings.append(Issue(sample.source, sample.id, (
            f"{sample.where()}: cut to max_length={processor.max_length} ({notes}); the last answer is partly or "
            f"wholly lost and {layout.num_images} of {len(sample.images)} image(s) are kept")))
    return None


def validate(samples: Sequence[Sample], processor: InternLMXComposer2Processor, check_images: bool = True,
             timeout: float = DEFAULT_URL_TIMEOUT) -> ValidationReport:
    """Report every row problem found by :func:`read_chatml`, build every training layout (kept in
    ``report.layouts``) and check every distinct image (``timeout`` per URL), before training."""
    report = ValidationReport(num_samples=len(samples), num_images=sum(len(s.images) for s in samples))
    max_pixels = processor.image_processor.max_pixels
    image_errors = _check_images(samples, timeout, max_pixels) if check_images else {}
    for index, sample in enumerate(samples):
        if sample.problem:
            report.invalid.add(index)
            report.problems.append(Issue(sample.source, sample.id, sample.problem))
            continue
        found = [_layout_problem(sample, processor, report)]
        found += [f"image {k} cannot be used: {image_errors[path]}" for k, path in enumerate(sample.images)
                  if image_errors.get(path)]
        found = [f"{sample.where()}: {message}" for message in found if message]
        if found:
            report.invalid.add(index)
            report.problems += [Issue(sample.source, sample.id, message) for message in found]
        else:
            report.supervised_tokens.append(report.layouts[sample.key].num_supervised)
    logger.info("validated training data:\n%s", report.summary(max_problems=0))
    return report


def apply_policy(samples: Sequence[Sample], report: ValidationReport, skip_invalid_samples: bool) -> List[Sample]:
    """The valid samples; raise with the summary if any is invalid and skipping is off."""
    if report.num_samples != len(samples):
        raise ValueError(f"the report covers {report.num_samples} samples but {len(samples)} were given; "
                         "pass the same list to validate() and apply_policy()")
    if report.problems and not skip_invalid_samples:
        raise DatasetError(f"{report.summary()}\nfix the data, or set skip_invalid_samples to train on the "
                           "valid samples only")
    kept = [sample for index, sample in enumerate(samples) if index not in report.invalid]
    if len(kept) < len(samples):
        logger.warning("skipping %d invalid sample(s) of %d (skip_invalid_samples)", len(samples) - len(kept),
                       len(samples))
    if not kept:
        raise DatasetError(f"no valid sample is left to train on:\n{report.summary()}")
    return kept


# --- dataset ---------------------------------------------------------------------------------
class ChatMLDataset(paddle.io.Dataset):
    """Validated samples as dicts of NumPy arrays for :class:`DataCollatorForChatML`.

    ``layouts`` is :attr:`ValidationReport.layouts` (any sample missing there is tokenized here); images are
    decoded in ``__getitem__`` to keep start-up and memory small. An image failing there (e.g. deleted
    since validation) raises :class:`DatasetError` with ``on_image_error="raise"``; with ``"skip"`` the
    next sample (``i + 1``, wrapping) is served instead, counted in ``skipped_at_runtime`` and in the
    item's ``skipped_samples`` entry, which the collator sums into the batch so the trainer can
    report it even when DataLoader workers (each with its own dataset copy) did the loading.
    """

    def __init__(self, samples: Sequence[Sample], processor: InternLMXComposer2Processor,
                 layouts: Optional[Mapping[str, Layout]] = None, on_image_error: str = "raise") -> None:
        super().__init__()
        if on_image_error not in ON_IMAGE_ERROR:
            raise ValueError(f"on_image_error must be one of {ON_IMAGE_ERROR}, got {on_image_error!r}")
        if not samples:
            raise DatasetError("no samples to train on; check the data files")
        self.samples, self.processor, self.on_image_error = list(samples), processor, on_image_error
        self.pad_token_id = processor.tokenizer.pad_token_id
        self.skipped_at_runtime = 0
        self.layouts = [self._layout(sample, (layouts or {}).get(sample.key)) for sample in self.samples]

    def _layout(self, sample: Sample, layout: Optional[Layout]) -> Layout:
        """The validated layout, or a new one; never a sample that is broken or has nothing to learn."""
        if sample.problem:
            raise DatasetError(f"{sample.problem} (run validate() and apply_policy() to skip invalid rows)")
        try:
            if layout is None:
                layout = self.processor.training_layout(sample.conversation, len(sample.images))
        except ValueError as err:
            raise DatasetError(f"{sample.where()}: cannot build its training sequence ({err})") from err
        if layout.num_supervised == 0:
            raise DatasetError(f"{sample.where()}: no answer token is left to learn (max_length="
                               f"{self.processor.max_length}); run validate() and apply_policy() first")
        return layout

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        count = len(self.samples)
        for step in range(count):
            sample, layout = self.samples[(index + step) % count], self.layouts[(index + step) % count]
            try:
                features = self._features(sample, layout)
                if step:
                    features[SKIPPED_KEY] = np.asarray(step, dtype=np.int64)  # summed by the collator
                return features
            except ImageLoadError as err:
                message = f"{sample.where()}: {err}"
                if self.on_image_error == "raise":
                    raise DatasetError(f"{message} Restore the image, or pass on_image_error='skip'.") from err
                self.skipped_at_runtime += 1
                logger.warning("serving the next sample instead of %s", message)
        raise DatasetError(f"no sample could load its images (the last: {message}); check the image files")

    def _features(self, sample: Sample, layout: Layout) -> Dict[str, np.ndarray]:
        ids = np.asarray(layout.ids, dtype=np.int64)
        features = {"input_ids": np.where(ids == IMAGE_SLOT, self.pad_token_id, ids),
                    "labels": np.asarray(layout.labels, dtype=np.int64),
                    "im_mask": np.asarray(layout.im_mask, dtype=np.int64)}
        pixels = []
        for k, path in enumerate(sample.images[: layout.num_images]):
            try:
                pixels.append(self.processor.pixel_values(path))
            except ImageLoadError as err:
                raise ImageLoadError(f"image {k} failed to load: {err}") from err
        if pixels:
            features["pixel_values"] = np.concatenate(pixels).astype(np.float32)
        return features
