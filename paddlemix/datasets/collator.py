"""Batching :class:`~paddlemix.datasets.chatml_dataset.ChatMLDataset` samples of any batch size.

The official code and PaddleMIX train with one sample per batch; here samples are right-padded to
a common length, so the model's causal mask plus ``attention_mask`` keep every real position
exactly as it would be alone, and the loss (mean over all labelled tokens of the batch) equals the
token-weighted mean of the per-sample losses.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle

__all__ = ["DataCollatorForChatML", "IGNORE_INDEX", "SKIPPED_KEY"]

IGNORE_INDEX = -100  # label of positions the loss skips (padding included)
RETURN_TENSORS = ("pd", "np")
# Batch entry: samples whose images failed at load time and were replaced (see ChatMLDataset);
# the trainer pops it before ``model(**batch)``.
SKIPPED_KEY = "skipped_samples"
# Padding value of each per-token key; attention_mask is derived (1 = real token, 0 = padding).
_PAD_VALUES = {"labels": IGNORE_INDEX, "im_mask": 0}


def _padded_length(lengths: Sequence[int], multiple: Optional[int]) -> int:
    """The longest length, rounded up to ``multiple`` (e.g. 8, for tensor-core friendly shapes)."""
    longest = max(lengths)
    return -(-longest // multiple) * multiple if multiple else longest


def _pad(rows: Sequence[np.ndarray], length: int, value: int) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class DataCollatorForChatML:
    """Right-pads a list of sample dicts (``input_ids``, ``labels``, ``im_mask``, optional
    ``pixel_values``) into one batch for ``model(**batch)``.

    ``pixel_values`` of all samples are concatenated in batch order, because the model fills the
    ``im_mask`` rows of the whole batch in row-major order; the key is left out for a text-only batch.
    ``return_tensors="pd"`` (default, what PaddleNLP's Trainer feeds to the model) or ``"np"``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None,
                 return_tensors: str = "pd") -> None:
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {RETURN_TENSORS}, got {return_tensors!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of!r}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_tensors = return_tensors

    def __call__(self, features: List[Mapping[str, Any]]) -> Dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty list of samples")
        ids = [np.asarray(f["input_ids"], dtype=np.int64) for f in features]
        self._check_lengths(features, ids)
        length = _padded_length([len(row) for row in ids], self.pad_to_multiple_of)
        batch = {"input_ids": _pad(ids, length, self.pad_token_id),
                 "attention_mask": _pad([np.ones(len(row), np.int64) for row in ids], length, 0)}
        for key, value in _PAD_VALUES.items():
            batch[key] = _pad([np.asarray(f[key], dtype=np.int64) for f in features], length, value)
        pixels = [np.asarray(f["pixel_values"], dtype=np.float32) for f in features
                  if f.get("pixel_values") is not None and len(f["pixel_values"])]
        if pixels:
            batch["pixel_values"] = np.concatenate(pixels)
        skipped = sum(int(f.get(SKIPPED_KEY, 0)) for f in features)
        if skipped:
            batch[SKIPPED_KEY] = np.asarray(skipped, dtype=np.int64)
        return self._to_tensors(batch) if self.return_tensors == "pd" else batch

    @staticmethod
    def _check_lengths(features: List[Mapping[str, Any]], ids: List[np.ndarray]) -> None:
        """Mismatched per-token arrays would be padded into silently wrong batches: refuse them."""
        for i, (feature, row) in enumerate(zip(features, ids)):
            for key in _PAD_VALUES:
                if len(feature[key]) != len(row):
                    raise ValueError(f"sample {i} of the batch has {len(row)} input_ids but {len(feature[key])} "
                                     f"{key}; every per-token array must have the same length")

    @staticmethod
    def _to_tensors(batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        return {key: paddle.to_tensor(value) for key, value in batch.items()}
