"""Where training metrics are reported. PaddleNLP's Trainer reports to VisualDL unless
``report_to`` says otherwise (the PaddleMIX README's example JSON has no ``report_to``); VisualDL
2.5 writes the run's arguments as hparams, bools among them, which protobuf 7 refuses
(``TypeError: ... Expected an int, got a boolean``) at the first log. The lock pins a protobuf
that takes them; with any other, VisualDL is switched off with one warning instead of a crash."""
from __future__ import annotations

import logging
from typing import Optional

from paddlenlp.trainer import TrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["visualdl_problem", "check_reporting"]


def visualdl_problem() -> Optional[str]:
    """Why VisualDL would fail to log a run here, or None: writes a bool hparam into a record,
    as the Trainer's first log does."""
    try:
        from google.protobuf import __version__ as protobuf_version
        from visualdl.proto.record_pb2 import Record
    except ImportError as err:
        return f"visualdl cannot be imported ({err})"
    try:
        Record.HParam.HparamInfo().int_value = True
    except TypeError:
        return f"protobuf {protobuf_version} refuses the bool hparams the Trainer logs"
    return None


def check_reporting(training: TrainingArguments) -> None:
    """Keep VisualDL in ``training.report_to`` only if it can log here; say where it logs."""
    if "visualdl" not in (training.report_to or []):
        return
    problem = visualdl_problem()
    if problem:
        training.report_to = [r for r in training.report_to if r != "visualdl"]
        logger.warning("not reporting to VisualDL: %s; pip install -c constraints.txt protobuf visualdl fixes it, "
                       'or set "report_to": "none"', problem)
    else:
        logger.info("reporting to VisualDL in %s (visualdl --logdir %s)", training.logging_dir, training.logging_dir)
