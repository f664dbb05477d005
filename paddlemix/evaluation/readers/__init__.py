"""Read an evaluation file in any supported format into items and bad rows."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import List, Optional

from ..items import BadRow, EvalItem
from .chatml import read_chatml_items
from .scienceqa import read_scienceqa_json
from .tsv import read_tsv

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "LoadedData", "detect_format", "load_data"]

FORMATS = ("chatml", "mmbench_tsv", "scienceqa")


@dataclass
class LoadedData:
    format: str
    items: List[EvalItem]
    bad_rows: List[BadRow]
    notes: List[str] = field(default_factory=list)  # rows left out on purpose (copies, other splits)


def _first_row(path: str) -> object:
    """The first row of a JSON list, of a ``pid → problem`` object, or of JSON Lines (None if unreadable)."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return json.loads(text.lstrip().split("\n", 1)[0])  # JSON Lines
        except json.JSONDecodeError:
            return None
    if isinstance(data, list):
        return data[0] if data else None
    return next(iter(data.values()), None) if isinstance(data, dict) else None


def detect_format(path: str) -> str:
    """``mmbench_tsv`` for ``.tsv`` (``scienceqa`` if the name says so); for JSON, the first row
    decides: ``conversations`` → chatml, ``question`` with ``choices`` or ``A`` → scienceqa."""
    name = os.path.basename(path).lower()
    if name.endswith(".tsv"):
        return "scienceqa" if "scienceqa" in name else "mmbench_tsv"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist (working directory {os.getcwd()!r})")
    row = _first_row(path)
    if isinstance(row, dict) and "conversations" in row:
        return "chatml"
    if isinstance(row, dict) and "question" in row and ("choices" in row or "A" in row):
        return "scienceqa"
    raise ValueError(f"cannot tell the format of {path}: its first row has neither \"conversations\" (chatml) nor "
                     "\"question\" with \"choices\" (scienceqa); pass --format chatml|mmbench_tsv|scienceqa")


def load_data(path: str, fmt: str = "auto", style: str = "official", circular: bool = False,
              image_root: Optional[str] = None, split: Optional[str] = None) -> LoadedData:
    """Items and bad rows of ``path``. ScienceQA TSVs (VLMEvalKit's) always use VLMEvalKit's prompt."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of auto, {', '.join(FORMATS)}")
    is_tsv = path.lower().endswith(".tsv")
    if circular and not is_tsv:
        raise ValueError("--circular works on TSV files (mmbench_tsv: lettered options, rotated copies), "
                         f"not on {fmt} JSON")
    if fmt == "chatml":
        items, bad = read_chatml_items(path, image_root)
        return LoadedData(fmt, items, bad)
    if not is_tsv:
        items, bad, other = read_scienceqa_json(path, image_root, split)
        notes = [f"{other} rows of other splits left out (--split {split})"] if other else []
        return LoadedData(fmt, items, bad, notes)
    result = read_tsv(path, "vlmevalkit" if fmt == "scienceqa" else style, circular, image_root)
    notes = [f"{result.skipped_copies} rotated copies left out (pass --circular to use them)"] \
        if result.skipped_copies else []
    return LoadedData(fmt, result.items, result.bad_rows, notes)
