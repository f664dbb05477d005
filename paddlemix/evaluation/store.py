"""Predictions on disk: one JSON line per answered row, appended as batches finish, so an
interrupted run resumes where it stopped.

Each batch's lines go to the file in one ``write`` on an ``O_APPEND`` descriptor: a killed process
leaves whole lines, or at worst one torn last line, which :meth:`PredictionStore.load` cuts off
(its row is then asked again). ``run.json`` beside it records the settings that produced the
predictions; resuming with different ones is refused rather than mixing two runs.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping

logger = logging.getLogger(__name__)

__all__ = ["PredictionStore", "check_run_settings"]

PREDICTIONS_FILE = "predictions.jsonl"
RUN_FILE = "run.json"


class PredictionStore:
    """``{id: record}`` of a predictions file; records are dicts with at least ``id``."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, PREDICTIONS_FILE)

    def load(self) -> Dict[str, Dict[str, Any]]:
        """The finished rows. A torn last line (no newline: the writer was killed) is truncated away."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            logger.warning("%s: cutting off a torn last line (%d bytes) of an interrupted run", self.path,
                           len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        records: Dict[str, Dict[str, Any]] = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}, line {number} is not valid JSON ({err.msg}); the file was edited "
                                 "or is not a predictions file: use another --out") from err
            records[str(record["id"])] = record
        return records

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` as JSON lines in a single write (whole lines survive a kill)."""
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        if not payload:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)


def check_run_settings(directory: str, settings: Mapping[str, Any]) -> None:
    """Write ``run.json`` on a first run; on a resume, refuse settings that differ from it."""
    path = os.path.join(directory, RUN_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        changed: List[str] = [f"{k}: {saved.get(k)!r} before, {settings.get(k)!r} now"
                              for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if changed:
            raise ValueError(f"{directory} holds predictions of a run with other settings ({'; '.join(changed)}); "
                             f"pass another --out, or delete {directory} to start over")
        return
    os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(settings), f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
