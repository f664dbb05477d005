"""Carry data-loading errors to the training loop instead of losing them.

Paddle's single-process ``DataLoader`` reads batches in a background thread; an exception
raised there (a ``DatasetError`` for an image that vanished, or any bug in a collator)
kills the thread and the epoch simply ends early — training goes on with the batches
that never came, and nobody is told. Wrapping the dataset and the collator so that an
exception becomes a marked batch, re-raised by the trainer in the main thread, makes such
a failure stop the run with its message (and works the same in worker processes).
"""
from __future__ import annotations

import traceback
from typing import Any, Callable, Dict, List

import numpy as np
import paddle

from ..datasets.chatml_dataset import DatasetError

__all__ = ["ERROR_KEY", "ErrorCarryingDataset", "ErrorCarryingCollator", "raise_carried_error"]

ERROR_KEY = "data_loading_error"
EXPECTED_KEY = "data_loading_error_expected"


def _describe(err: BaseException) -> Dict[str, Any]:
    """The exception as arrays (a DataLoader turns every batch entry into a tensor)."""
    expected = isinstance(err, DatasetError)
    text = str(err) if expected else "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return {ERROR_KEY: np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy(),
            EXPECTED_KEY: np.asarray(int(expected), dtype=np.int64)}


class ErrorCarryingDataset(paddle.io.Dataset):
    """``dataset[i]``, or a marker dict holding the exception it raised."""

    def __init__(self, dataset: paddle.io.Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        try:
            return self.dataset[index]
        except Exception as err:  # noqa: BLE001 - re-raised in the main thread by raise_carried_error
            return _describe(err)

    def __getattr__(self, name: str) -> Any:  # samples, layouts, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ErrorCarryingCollator:
    """``collate(features)``, or the first carried error / the collator's own exception."""

    def __init__(self, collate: Callable[[List[Dict[str, Any]]], Dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, Any]:
        carried = next((f for f in features if ERROR_KEY in f), None)
        if carried is not None:
            return {ERROR_KEY: carried[ERROR_KEY], EXPECTED_KEY: carried[EXPECTED_KEY]}
        try:
            return self.collate(features)
        except Exception as err:  # noqa: BLE001 - re-raised in the main thread by raise_carried_error
            return _describe(err)


def raise_carried_error(batch: Dict[str, Any]) -> None:
    """Raise the error a batch carries: ``DatasetError`` for bad data (a clear message),
    ``RuntimeError`` with the original traceback text for anything else (a bug)."""
    if ERROR_KEY not in batch:
        return
    message = np.asarray(batch[ERROR_KEY]).astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    if int(np.asarray(batch[EXPECTED_KEY])):
        raise DatasetError(message)
    raise RuntimeError(f"data loading failed:\n{message}")
