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

import logging
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import paddle

from ..models.internlm_xcomposer2.image_processing import ImageLoadError
from ..models.internlm_xcomposer2.processor import IMAGE_SLOT, InternLMXComposer2Processor, Layout
from .chatml_reader import DatasetError, Sample, read_chatml
from .chatml_validation import Issue, ValidationReport, apply_policy, validate
from .collator import SKIPPED_KEY

logger = logging.getLogger(__name__)

__all__ = ["DatasetError", "Sample", "Issue", "ValidationReport", "read_chatml", "validate", "apply_policy",
           "ChatMLDataset"]

ON_IMAGE_ERROR = ("raise", "skip")


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
