"""What the readers produce: evaluation items, and the rows they could not use.

Every format becomes a list of :class:`EvalItem`. An item is either a benchmark question asked
with the official evaluation layout (``kind == "mcq"``: BOS, the image, then the prompt) or a
chat question asked as the model was fine-tuned (``kind == "chat"``: our chatml rows, through
``batch_chat``). Images stay unloaded (an :class:`ImageRef`) until their batch runs.
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from ..models.internlm_xcomposer2.image_processing import URL_SCHEMES

__all__ = ["BadRow", "EvalItem", "ImageRef", "RowProblem", "image_ref"]

DATA_URI_PREFIX = "data:image/"
# Shorter strings cannot be an encoded image; VLMEvalKit uses the same bound to tell an index
# reference (a rotated copy pointing at its original's image) from base64.
MAX_REFERENCE_CHARS = 64
KINDS = ("mcq", "chat")


class RowProblem(ValueError):
    """A row the tool cannot evaluate; the reader turns it into a :class:`BadRow`."""


@dataclass(frozen=True)
class BadRow:
    """A row left out, with where it is (file and row) and why. Counted in the summary."""

    location: str  # "data/mmbench.tsv, row 12 (0-based; line 14), index 1012"
    reason: str
    group: Optional[str] = None  # circular evaluation: the question this pass belongs to

    def as_dict(self) -> Dict[str, str]:
        return {"location": self.location, "reason": self.reason}


@dataclass(frozen=True)
class ImageRef:
    """An image not loaded yet: a local path, a URL, or base64 text (decoded only when needed)."""

    kind: str  # "path" | "url" | "base64"
    value: str

    def source(self) -> Union[str, bytes]:
        """What ``load_image`` accepts: the path/URL, or the decoded bytes."""
        if self.kind != "base64":
            return self.value
        text = self.value.split(",", 1)[1] if self.value.startswith(DATA_URI_PREFIX) else self.value
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RowProblem(f"the image is not valid base64 ({err})") from err


def image_ref(value: str, base_dir: str) -> ImageRef:
    """Classify an image cell: URL, data URI, an existing file (relative to ``base_dir``), else base64.

    Something that looks like a path (short, or with a dot: base64 has none) but is no file raises
    :class:`RowProblem` (a missing image)."""
    value = value.strip()
    if value.lower().startswith(URL_SCHEMES):
        return ImageRef("url", value)
    if value.startswith(DATA_URI_PREFIX):
        return ImageRef("base64", value)
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
    if os.path.isfile(path):
        return ImageRef("path", path)
    if os.path.isdir(path):
        raise RowProblem(f"missing image: {value!r} is a directory ({path}), not an image file")
    if not value or len(value) <= MAX_REFERENCE_CHARS or "." in value or any(c.isspace() for c in value):
        raise RowProblem(f"missing image: {value!r} not found (looked for {path}); fix the path or pass --image_root")
    return ImageRef("base64", value)


@dataclass
class EvalItem:
    """One question to ask. ``options`` maps letters to option texts (empty for open questions);
    ``answer`` is the right letter, or the reference text of an open chat question."""

    id: str
    location: str
    kind: str
    prompt: str  # mcq: the text after the image; chat: the query with <ImageHere> tags
    answer: str
    options: Dict[str, str] = field(default_factory=dict)
    images: List[ImageRef] = field(default_factory=list)
    category: str = ""
    l2_category: Optional[str] = None
    group: str = ""  # circular evaluation: the id of the original question (passes share it)
    history: List[Tuple[str, str]] = field(default_factory=list)  # chat: earlier turns

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.group = self.group or self.id
