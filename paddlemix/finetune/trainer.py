"""PaddleNLP ``Trainer`` with the few changes fine-tuning this model needs.

* A seeded, per-epoch data order (``DistributedBatchSampler`` keyed by seed + epoch) on one
  process and many, so a resumed run sees exactly the batches an uninterrupted one would.
* RNG state (dropout) restored on resume even when the checkpoint sits on an epoch
  boundary, where PaddleNLP skips it.
* Samples skipped because an image failed mid-training are added to the logs.
* A checkpoint that cannot be written stops the run with a message naming the resume point.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Optional

import paddle
from paddle.io import DistributedBatchSampler
from paddlenlp.trainer import Trainer, TrainerCallback, TrainerState
from paddlenlp.trainer.trainer import TRAINER_STATE_NAME
from paddlenlp.trainer.trainer_utils import TrainOutput

from ..datasets.collator import SKIPPED_KEY
from .checkpoints import last_complete_checkpoint
from .safe_loading import raise_carried_error

logger = logging.getLogger(__name__)

__all__ = ["SFTTrainer", "SeededBatchSampler"]


class SeededBatchSampler(DistributedBatchSampler):
    """Shuffles epoch ``e`` with ``RandomState(seed + e)``: the order depends only on the
    seed and the epoch, never on what ran before (a resumed run replays it exactly)."""

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int = 0, consumed_samples: int = 0) -> None:
        self.epoch = self.seed + epoch


class _RestoreRngAtEpochStart(TrainerCallback):
    """PaddleNLP restores the RNG only after skipping batches inside an epoch; a checkpoint on
    an epoch boundary skips none, so its RNG state would be lost. Restore it here."""

    def __init__(self, trainer: "SFTTrainer") -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        checkpoint = self.trainer.resumed_from
        if checkpoint is not None and state.global_step > 0 and self.trainer.steps_per_epoch:
            if state.global_step % self.trainer.steps_per_epoch == 0:
                self.trainer._load_rng_state(checkpoint)
        self.trainer.resumed_from = None  # only the first epoch of a resumed run
        return control


class _LogMetrics(TrainerCallback):
    """One readable line per logging step (PaddleNLP's own lines go to its verbose logger)."""

    KEYS = ("loss", "eval_loss", "learning_rate", "skipped_samples", "train_loss", "train_runtime",
            "eval_generation_accuracy")

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = [f"{k} {logs[k]:.4g}" for k in self.KEYS if logs and isinstance(logs.get(k), (int, float))]
        if shown and args.should_save:
            logger.info("step %d/%d: %s", state.global_step, state.max_steps, ", ".join(shown))
        return control


class SFTTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resumed_from: Optional[str] = None
        self.steps_per_epoch = 0
        self.skipped_samples = 0
        self.add_callback(_RestoreRngAtEpochStart(self))
        self.add_callback(_LogMetrics())

    def _get_train_sampler(self) -> Optional[paddle.io.Sampler]:
        if self.train_dataset is None:
            return None
        return SeededBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=True,
            num_replicas=max(self.args.dataset_world_size, 1),
            rank=max(self.args.dataset_rank, 0),
            drop_last=self.args.dataloader_drop_last,
            seed=self.args.seed,
        )

    def train(self, resume_from_checkpoint: Optional[str] = None, **kwargs: Any):
        self.resumed_from = resume_from_checkpoint
        batches = len(self.get_train_dataloader())
        self.steps_per_epoch = max(batches // max(self.args.gradient_accumulation_steps, 1), 1)
        if resume_from_checkpoint and self._finished(resume_from_checkpoint):
            # PaddleNLP would run one step past max_steps when resuming a finished run.
            logger.warning("%s already reached the last step; loading it without training", resume_from_checkpoint)
            self._load_from_checkpoint(resume_from_checkpoint)
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            return TrainOutput(state.global_step, 0.0, {})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: Optional[str] = None) -> None:
        """Rotation happens in ``CheckpointCompleteCallback`` once a checkpoint is complete."""

    def _finished(self, checkpoint: str) -> bool:
        state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
        max_steps = self.args.max_steps
        if max_steps <= 0:
            max_steps = int(math.ceil(self.args.num_train_epochs * self.steps_per_epoch))
        return state.global_step >= max_steps

    def _prepare_inputs(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        raise_carried_error(inputs)
        # The collator reports samples served in place of ones whose images failed to load
        # (counted in the DataLoader workers, where the dataset copies live).
        skipped = inputs.pop(SKIPPED_KEY, None)
        if skipped is not None:
            self.skipped_samples += int(skipped)
        return super()._prepare_inputs(inputs)

    def log(self, logs: Dict[str, float], **kwargs: Any) -> None:
        if self.skipped_samples:
            logs["skipped_samples"] = self.skipped_samples
        super().log(logs, **kwargs)

    def _save_checkpoint(self, model, metrics=None):
        """A save that fails (disk full, read-only or vanished output_dir) stops the run with
        one clear message; the half-written checkpoint has no completeness marker, so the
        previous one stays the resume point."""
        try:
            return super()._save_checkpoint(model, metrics=metrics)
        except OSError as err:
            previous = last_complete_checkpoint(self.args.output_dir)
            raise OSError(
                f"could not write checkpoint-{self.state.global_step} in {self.args.output_dir} "
                f"({err.strerror or err}); the last complete checkpoint is "
                f"{previous or 'none'}: free space or fix the directory, then rerun the same command to resume"
            ) from err
