"""Fine-tuning arguments: one JSON file + command-line overrides, parsed by PaddleNLP's
``PdArgumentParser`` into model, data and training (``paddlenlp.trainer.TrainingArguments``)
dataclasses.

Before PaddleNLP sees the file, every key and value is checked here, so a typo gets
"did you mean" instead of argparse's prefix matching (``max_len`` would silently set
``max_length``), and a wrong type names the file and key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from paddlenlp.trainer import PdArgumentParser, TrainingArguments

from .lora import OFFICIAL_LORA_TARGETS

__all__ = ["ModelArguments", "DataArguments", "ArgumentError", "parse_arguments", "SOURCES"]

SOURCES = ("paddlenlp", "aistudio", "huggingface")
IMAGE_ERROR_POLICIES = ("raise", "skip")


class ArgumentError(ValueError):
    """A bad argument file or value; the message names the file/key and the fix."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="internlm/internlm-xcomposer2-7b",
                                    metadata={"help": "local checkpoint directory or hub id"})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "default: model_name_or_path"})
    source: str = field(default="paddlenlp", metadata={"help": f"where hub ids come from: {', '.join(SOURCES)}"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "download cache directory"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all LLM weights"})
    lora_rank: int = field(default=64, metadata={"help": "LoRA rank (official fine-tuning: 64)"})
    lora_alpha: float = field(default=64, metadata={"help": "LoRA alpha (scaling = alpha / rank)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch input"})
    lora_target_modules: List[str] = field(default_factory=lambda: list(OFFICIAL_LORA_TARGETS),
                                           metadata={"help": "linears that get LoRA (name suffixes or regexes)"})
    lora_path: Optional[str] = field(default=None, metadata={"help": "continue training from this adapter"})
    fix_vit: bool = field(default=True, metadata={"help": "freeze the vision tower"})
    fix_vision_proj: bool = field(default=False, metadata={"help": "freeze the projector"})
    freeze_include: List[str] = field(default_factory=list, metadata={"help": "regexes of parameters to freeze"})
    freeze_exclude: List[str] = field(default_factory=list,
                                      metadata={"help": "regexes of parameters to keep trainable (wins over the rest)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "alias of the Trainer's recompute"})


@dataclass
class DataArguments:
    dataset: str = field(default="", metadata={"help": 'JSON: {"train": [{"name": "chatml_dataset", "data_files": '
                                                        '...}], "eval": [...]}'})
    mixtoken: bool = field(default=False, metadata={"help": "PaddleMIX's token packing; not supported here"})
    max_length: int = field(default=4096, metadata={"help": "truncation length of a sample (tokens incl. images)"})
    image_root: Optional[str] = field(default=None, metadata={"help": "base of relative image paths"})
    skip_invalid_samples: bool = field(default=False, metadata={"help": "skip (and count) broken rows instead of stopping"})
    on_image_error: str = field(default="raise", metadata={"help": "an image failing during training: raise or skip"})
    check_images: bool = field(default=True, metadata={"help": "open every image before training"})
    image_timeout: float = field(default=10.0, metadata={"help": "seconds to fetch an image URL"})
    eval_with_do_generation: bool = field(default=False,
                                          metadata={"help": "also answer eval questions greedily and report accuracy"})


DATACLASSES = (ModelArguments, DataArguments, TrainingArguments)


def _fields() -> Dict[str, dataclasses.Field]:
    return {f.name: f for cls in DATACLASSES for f in dataclasses.fields(cls) if f.init}


def _type_problem(key: str, value: Any, annotation: Any) -> Optional[str]:
    """Why ``value`` does not fit ``annotation``, or None."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _type_problem(key, value, inner[0]) if len(inner) == 1 else None
    if origin in (list, List):  # a single value is a one-element list, as on the command line
        values = value if isinstance(value, list) else [value]
        problems = [_type_problem(key, v, args[0]) for v in values] if args else []
        return next((p for p in problems if p), None)
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(annotation)
    if key == "dataset" and isinstance(value, dict):
        return None
    if expected is None:
        return None
    if annotation is not bool and isinstance(value, bool) or not isinstance(value, expected):
        return f"must be {annotation.__name__}, got {json.dumps(value, ensure_ascii=False)}"
    return None


def _check_json(path: str, values: Dict[str, Any]) -> None:
    known = _fields()
    problems = []
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        hints = typing.get_type_hints(next(c for c in DATACLASSES if key in {f.name for f in dataclasses.fields(c)}))
        why = _type_problem(key, value, hints.get(key))
        if why:
            problems.append(f"key {key!r} {why}")
    if problems:
        raise ArgumentError(f"{path}: " + "; ".join(problems))


def _to_argv(values: Dict[str, Any]) -> List[str]:
    argv: List[str] = []
    for key, value in values.items():
        if value is None:  # null = the default (PdArgumentParser would pass the string "None")
            continue
        if isinstance(value, list):
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ArgumentError(f"argument file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ArgumentError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(values, dict):
        raise ArgumentError(f"{path}: expected a JSON object of argument names to values")
    _check_json(path, values)
    return values


def _validate(model: ModelArguments, data: DataArguments, training: TrainingArguments) -> None:
    if data.mixtoken:
        raise ArgumentError("mixtoken: true is not supported for InternLM-XComposer2 (its PLoRA image rows cannot be "
                            "packed across samples); set it to false")
    if model.source not in SOURCES:
        raise ArgumentError(f"source must be one of {SOURCES}, got {model.source!r}")
    if data.on_image_error not in IMAGE_ERROR_POLICIES:
        raise ArgumentError(f"on_image_error must be one of {IMAGE_ERROR_POLICIES}, got {data.on_image_error!r}")
    if data.max_length <= 0:
        raise ArgumentError(f"max_length must be positive, got {data.max_length}")
    if not data.dataset:
        raise ArgumentError('dataset is required, e.g. {"train": [{"name": "chatml_dataset", "data_files": "train.json"}]}')
    _check_writable(training.output_dir)


def _check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ArgumentError(f"output_dir {directory!r} is not writable ({err.strerror}); choose another output_dir") from None


def parse_arguments(argv: Sequence[str]) -> Tuple[ModelArguments, DataArguments, TrainingArguments]:
    """``[config.json] [--key value ...]`` → the three dataclasses; flags override the file."""
    argv = list(argv)
    values = _read_json(argv.pop(0)) if argv and argv[0].endswith(".json") else {}
    parser = PdArgumentParser(DATACLASSES, allow_abbrev=False)
    try:
        model, data, training = parser.parse_args_into_dataclasses(args=_to_argv(values) + argv)
    except ValueError as err:  # e.g. TrainingArguments: bf16 and fp16 both set
        raise ArgumentError(str(err)) from None
    _validate(model, data, training)
    return model, data, training
