"""Evaluation of InternLM-XComposer2 checkpoints on multiple-choice benchmarks (MMBench-style TSV,
ScienceQA) and on our chatml files, with the official prompts and answer extraction.

``paddlemix/tools/evaluate.py`` is the command line; :func:`run_evaluation` the library entry.
"""
from .extraction import can_infer, official_letter
from .items import BadRow, EvalItem, ImageRef
from .pipeline import FORMAT_DEFAULTS, EvalConfig, EvalResult, run_evaluation, select_items
from .prompts import mcq_prompt
from .readers import FORMATS, LoadedData, detect_format, load_data
from .summary import markdown_table, summarise

__all__ = [
    "BadRow",
    "EvalConfig",
    "EvalItem",
    "EvalResult",
    "FORMATS",
    "FORMAT_DEFAULTS",
    "ImageRef",
    "LoadedData",
    "can_infer",
    "detect_format",
    "load_data",
    "markdown_table",
    "mcq_prompt",
    "official_letter",
    "run_evaluation",
    "select_items",
    "summarise",
]
