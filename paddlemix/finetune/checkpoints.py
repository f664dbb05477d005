"""Which Trainer checkpoint is safe to resume from.

PaddleNLP writes ``checkpoint-N`` in place, file by file, and ``get_last_checkpoint``
takes the highest N without checking it: a run killed while saving would resume from a
half-written directory. A marker file written after the Trainer finished a checkpoint
(``on_save`` fires after model, optimizer, scheduler, RNG and state are on disk) makes
completeness explicit; directories without it are moved aside, never deleted. Rotation
(``save_total_limit``) also happens here, after the marker: PaddleNLP rotates before the
checkpoint is known complete (and, on one process, never: it checks ``local_rank == 0``
while a single process has ``local_rank == -1``).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import List, Optional

from paddlenlp.trainer import TrainerCallback

logger = logging.getLogger(__name__)

__all__ = ["COMPLETE_MARKER", "CheckpointCompleteCallback", "last_complete_checkpoint", "rotate_complete",
           "set_aside_incomplete"]

COMPLETE_MARKER = ".complete"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Files without which the Trainer cannot resume (model weights: full or LoRA adapter).
_REQUIRED = ("trainer_state.json", "optimizer.pdopt", "scheduler.pdparams")
_WEIGHTS = ("model_state.pdparams", "lora_model_state.pdparams", "model_state.pdparams.index.json")


def _checkpoints(output_dir: str) -> List[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir) if (m := _CHECKPOINT_DIR.match(d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and all(
        os.path.isfile(os.path.join(path, f)) for f in _REQUIRED
    ) and any(os.path.isfile(os.path.join(path, f)) for f in _WEIGHTS)


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    complete = [p for p in _checkpoints(output_dir) if is_complete(p)]
    return complete[-1] if complete else None


def set_aside_incomplete(output_dir: str) -> List[str]:
    """Rename checkpoints newer than the last complete one to ``*.incomplete-<time>``, so the
    Trainer (which picks by number and rotates by age) can neither resume from nor count them."""
    last = last_complete_checkpoint(output_dir)
    moved = []
    for path in _checkpoints(output_dir):
        if path != last and not is_complete(path):
            target = f"{path}.incomplete-{int(time.time())}"
            os.replace(path, target)
            moved.append(target)
            logger.warning("checkpoint %s was not completely written (interrupted save?); moved to %s", path, target)
    return moved


def rotate_complete(output_dir: str, keep: Optional[int], protect: Optional[str] = None) -> List[str]:
    """Delete the oldest *complete* checkpoints beyond ``keep`` (never ``protect``, e.g. the
    best model, and never the newest complete one). Runs after the new checkpoint's marker
    is written, so a crash at any point leaves at least one complete checkpoint."""
    if not keep or keep <= 0:
        return []
    complete = [p for p in _checkpoints(output_dir) if is_complete(p)]
    doomed = [p for p in complete[:-keep] if p != protect]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        logger.info("deleted %s (save_total_limit %d)", path, keep)
    return doomed


class CheckpointCompleteCallback(TrainerCallback):
    """Write the completeness marker once the Trainer has finished a checkpoint, then rotate."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                with open(os.path.join(path, COMPLETE_MARKER), "w", encoding="utf-8") as f:
                    f.write(f"{state.global_step}\n")
                rotate_complete(args.output_dir, args.save_total_limit, state.best_model_checkpoint)
        return control
