"""MMBench-style TSV, as VLMEvalKit distributes its benchmarks (MMBench, ScienceQA_TEST, SEED, AI2D, ...).

Columns: ``index, question, hint, A, B, [C, D, E], answer, category, [l2-category], image`` with the
image as base64 (or a path/URL; or ``image_path``). Read with pandas' defaults exactly as both
references read it, so cells such as ``None`` or ``N/A`` become NaN there and here alike.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ..circular import copy_offset, group_index, is_rotated_copy, rotated_copies
from ..items import MAX_REFERENCE_CHARS, BadRow, EvalItem, ImageRef, RowProblem, image_ref
from ..prompts import is_missing
from .mcq import item_from_row

logger = logging.getLogger(__name__)

__all__ = ["REQUIRED_COLUMNS", "TsvReadResult", "read_tsv"]

REQUIRED_COLUMNS = ("index", "question", "A", "B", "answer")
IMAGE_COLUMNS = ("image", "image_path")


@dataclass
class TsvReadResult:
    items: List[EvalItem]
    bad_rows: List[BadRow]
    skipped_copies: int = 0  # rotated copies left out (no --circular)


def _load_table(path: str) -> List[Dict[str, Any]]:
    import pandas as pd

    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist (working directory {os.getcwd()!r})")
    try:
        table = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ValueError(f"{path} is not a readable TSV file ({err}); VLMEvalKit's TSV layout is expected") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        hint = " (an MMBench test split has no answers: it can only be scored by its server)" if missing == [
            "answer"] else ""
        raise ValueError(f"{path} has no column(s) {', '.join(missing)}{hint}; columns found: "
                         f"{', '.join(map(str, table.columns))}")
    if not any(c in table.columns for c in IMAGE_COLUMNS):
        raise ValueError(f"{path} has no image column ({' or '.join(IMAGE_COLUMNS)})")
    return table.to_dict("records")


def _index(row: Dict[str, Any]) -> int:
    value = row.get("index")
    if is_missing(value) or float(value) != int(float(value)):
        raise RowProblem(f"index {value!r} is not an integer")
    return int(float(value))


def _image(row: Dict[str, Any], images: Dict[int, Any], base_dir: str) -> ImageRef:
    """The row's image; a short number in the image cell refers to the image of that index."""
    value = row.get("image", row.get("image_path"))
    text = "" if is_missing(value) else str(value).strip()
    if len(text) <= MAX_REFERENCE_CHARS and text.isdigit() and int(text) in images and int(text) != row["index"]:
        original = images[int(text)]
        text = "" if is_missing(original) else str(original).strip()
    if not text:
        raise RowProblem("missing image: the image cell is empty")
    return image_ref(text, base_dir)


def _split_copies(rows: List[Tuple[str, Dict[str, Any]]], circular: bool) -> Tuple[List[Tuple[str, Dict]], int, bool]:
    """``(rows to read, copies left out, whether to build rotations)``. A file's own rotated copies
    are kept for --circular (every row then gets ``group``: its original's index) and left out without."""
    indices = {row["index"] for _, row in rows}
    copies = {i for i in indices if is_rotated_copy(i, indices)}
    if not circular:
        return [(where, row) for where, row in rows if row["index"] not in copies], len(copies), False
    if copies:
        return [(where, {**row, "group": group_index(row["index"])}) for where, row in rows], 0, False
    return [(where, {**row, "group": row["index"]}) for where, row in rows], 0, True


def _build(rows, style: str, circular: bool, images: Dict[int, Any], base_dir: str, items: List[EvalItem],
           bad: List[BadRow]) -> List[Tuple[str, Dict[str, Any]]]:
    """Append the items (or bad rows) of ``rows``; return the rows that became items."""
    good = []
    for where, row in rows:
        group = str(row["group"]) if circular else ""
        try:
            items.append(item_from_row(row, str(row["index"]), where, style, _image(row, images, base_dir), group))
            good.append((where, row))
        except RowProblem as err:
            bad.append(BadRow(where, str(err), group or None))
    return good


def read_tsv(path: str, style: str = "official", circular: bool = False,
             image_root: Optional[str] = None) -> TsvReadResult:
    """Items of an MMBench-style TSV (file-level problems raise; row-level ones become bad rows).
    With --circular and no rotated copies in the file, they are built for every usable question."""
    base_dir = os.path.abspath(os.path.dirname(path) if image_root is None else os.path.expanduser(image_root))
    rows, bad, seen = [], [], {}
    for number, row in enumerate(_load_table(path)):
        where = f"{path}, row {number} (0-based; line {number + 2})"
        try:
            row["index"] = _index(row)
            if row["index"] in seen:
                raise RowProblem(f"duplicate index {row['index']}, already used by row {seen[row['index']]}")
            seen[row["index"]] = number
            rows.append((f"{where}, index {row['index']}", row))
        except RowProblem as err:
            bad.append(BadRow(where, str(err)))
    rows, skipped, build_rotations = _split_copies(rows, circular)
    images = {row["index"]: row.get("image", row.get("image_path")) for _, row in rows}
    items: List[EvalItem] = []
    good = _build(rows, style, circular, images, base_dir, items, bad)
    if build_rotations:
        offset, copies = copy_offset(images), []
        for where, row in good:
            try:
                copies += [(f"{where}, rotation {k + 1}", c) for k, c in enumerate(rotated_copies(row, offset))]
            except ValueError as err:
                raise ValueError(f"{where}: {err}; evaluate this file without --circular") from err
        _build(copies, style, circular, images, base_dir, items, bad)
    if skipped:
        logger.info("%s: %d rotated copies left out (pass --circular to use them)", path, skipped)
    return TsvReadResult(items, bad, skipped)
