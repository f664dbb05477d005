"""The evaluation run: read the data, pick the rows, answer the unanswered ones batch by batch
(appending predictions as they come), then summarise, tabulate and plot.

    data file ──readers──▶ items ──select──▶ batches ──Answerer──▶ predictions.jsonl
                                                                        │ (resume: finished ids skipped)
                                   summary.json / summary.md / summary.png ◀──summarise──┘
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION, build_chat_prompt
from .items import EvalItem
from .readers import LoadedData, load_data
from .scoring import score
from .store import PredictionStore, check_run_settings
from .summary import markdown_table, summarise, write_summary

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_DEFAULTS", "EvalConfig", "EvalResult", "run_evaluation", "select_items"]

# The official decoding of each format: benchmarks as the IXC2 scripts / VLMEvalKit's
# generate_multichoice (5 new tokens, 5 beams, no penalty); chat rows as model.chat's defaults,
# greedy, with a budget for a short answer.
FORMAT_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mmbench_tsv": {"max_new_tokens": 5, "num_beams": 5, "repetition_penalty": 1.0},
    "scienceqa": {"max_new_tokens": 5, "num_beams": 5, "repetition_penalty": 1.0},
    "chatml": {"max_new_tokens": 64, "num_beams": 1, "repetition_penalty": 1.005},
}
CHART_FILE = "summary.png"


@dataclass
class EvalConfig:
    model: str
    data: str
    out: str = "results"
    format: str = "auto"
    batch_size: int = 8
    max_new_tokens: Optional[int] = None  # None: the format's official value (FORMAT_DEFAULTS)
    num_beams: Optional[int] = None
    repetition_penalty: Optional[float] = None
    meta_instruction: Optional[str] = None  # chat rows; None: the official chat system prompt
    prompt_style: str = "official"  # mmbench_tsv: "official" (IXC2 script) or "vlmevalkit"
    extract: str = "vlmevalkit"
    circular: bool = False
    limit: Optional[int] = None
    shuffle: bool = False
    seed: int = 0
    image_root: Optional[str] = None
    split: Optional[str] = None
    dtype: str = "float32"
    progress: bool = True
    retry_errors: bool = False  # on a resume, ask again the rows whose earlier answer was an error


@dataclass
class EvalResult:
    summary: Dict[str, Any]
    table: str  # Markdown
    paths: Dict[str, str] = field(default_factory=dict)
    answered_now: int = 0  # rows generated in this call (0: everything came from an earlier run)


def select_items(items: Sequence[EvalItem], limit: Optional[int], shuffle: bool, seed: int,
                 circular: bool) -> List[EvalItem]:
    """Rows to evaluate, in order: questions shuffled with ``seed`` (all passes of a circular question
    stay together), then the first ``limit`` questions."""
    units: Dict[str, List[EvalItem]] = {}
    for item in items:
        units.setdefault(item.group if circular else item.id, []).append(item)
    order = list(units)
    if shuffle:
        random.Random(seed).shuffle(order)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be a positive number of questions, got {limit}")
        order = order[:limit]
    return [item for key in order for item in units[key]]


def _decode_settings(config: EvalConfig, fmt: str) -> Dict[str, Any]:
    values = {k: getattr(config, k) if getattr(config, k) is not None else default
              for k, default in FORMAT_DEFAULTS[fmt].items()}
    if values["max_new_tokens"] <= 0 or values["num_beams"] <= 0:
        raise ValueError("--max_new_tokens and --num_beams must be positive")
    values["meta_instruction"] = "" if fmt != "chatml" else (
        DEFAULT_META_INSTRUCTION if config.meta_instruction is None else config.meta_instruction)
    return values


def _run_settings(config: EvalConfig, fmt: str, decode: Mapping[str, Any]) -> Dict[str, Any]:
    """What the predictions depend on (``run.json``); --limit/--shuffle only pick rows, so they may change."""
    model = os.path.abspath(config.model) if os.path.exists(config.model) else config.model
    return {"model": model, "data": os.path.abspath(config.data), "format": fmt, "dtype": config.dtype,
            "prompt_style": config.prompt_style if fmt == "mmbench_tsv" else None, "extract": config.extract,
            "circular": config.circular, "image_root": config.image_root, **decode}


def _prompt(item: EvalItem, meta_instruction: str) -> str:
    """The text the model is given: a benchmark prompt (the image precedes it), or the whole chat prompt."""
    if item.kind == "mcq":
        return item.prompt
    return build_chat_prompt(item.prompt, item.history, meta_instruction, text_only=not item.images)


def _record(item: EvalItem, answer: Any, meta_instruction: str, extract: str) -> Dict[str, Any]:
    record = {"id": item.id, "prompt": _prompt(item, meta_instruction), "answer": item.answer}
    if isinstance(answer, str):
        choice, correct = score(item, answer, extract)
        return {**record, "raw": answer, "choice": choice, "correct": correct}
    return {**record, "raw": None, "choice": None, "correct": False, "error": str(answer)}


def _check_resumed(items: Sequence[EvalItem], done: Mapping[str, Mapping[str, Any]], meta: str) -> None:
    for item in items:
        if item.id in done and _prompt(item, meta) != done[item.id].get("prompt"):
            raise ValueError(f"{item.location}: its prompt differs from the one in the predictions of the earlier "
                             "run (the data changed?); pass another --out, or delete it to start over")


def _answer_pending(selected: Sequence[EvalItem], done: Dict[str, Dict[str, Any]], store: PredictionStore,
                    make_answerer: Callable[[], Any], config: EvalConfig, meta: str) -> int:
    """Answer the rows not in ``done`` in fixed chunks of the selection (so a resumed run batches
    the remaining rows of a chunk as the first run would have); returns how many were answered."""
    from tqdm import tqdm

    pending = [item for item in selected if item.id not in done]
    if not pending:
        return 0
    answerer = make_answerer()
    with tqdm(total=len(selected), initial=len(selected) - len(pending), desc="evaluating", unit="row",
              disable=not config.progress, dynamic_ncols=True) as bar:
        for start in range(0, len(selected), config.batch_size):
            todo = [item for item in selected[start:start + config.batch_size] if item.id not in done]
            if not todo:
                continue
            records = [_record(item, answer, meta, config.extract) for item, answer in zip(todo, answerer.answer(todo))]
            store.append(records)
            done.update((r["id"], r) for r in records)
            bar.update(len(todo))
    return len(pending)


def run_evaluation(config: EvalConfig, load_model: Callable[[], Tuple[Any, Any]]) -> EvalResult:
    """Evaluate; ``load_model() -> (model, tokenizer)`` is called only if some row still needs an answer."""
    from .answering import Answerer, DecodeOptions

    if config.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {config.batch_size}")
    data: LoadedData = load_data(config.data, config.format, config.prompt_style, config.circular,
                                 config.image_root, config.split)
    decode = _decode_settings(config, data.format)
    for row in data.bad_rows:
        logger.info("bad row: %s: %s", row.location, row.reason)
    selected = select_items(data.items, config.limit, config.shuffle, config.seed, config.circular)
    check_run_settings(config.out, _run_settings(config, data.format, decode))
    store = PredictionStore(config.out)
    done = store.load()
    _check_resumed(selected, done, decode["meta_instruction"])
    failed = [item.id for item in selected if done.get(item.id, {}).get("error") is not None]  # this run's rows
    if failed and config.retry_errors:  # asked again; their new lines supersede the old ones on load
        logger.info("retrying %d rows that failed in the earlier run", len(failed))
        for row_id in failed:
            del done[row_id]
    elif failed:
        logger.warning("%d rows failed in the earlier run and keep their error (pass --retry_errors to ask them "
                       "again, e.g. after fixing an image path)", len(failed))

    def make_answerer():
        model, tokenizer = load_model()
        return Answerer(model, tokenizer, DecodeOptions(**decode))

    answered = _answer_pending(selected, done, store, make_answerer, config, decode["meta_instruction"])
    return _finish(config, data, selected, done, answered)


def _model_name(model: str) -> str:
    """A hub id as given; a local checkpoint by its last two folders (``run3/checkpoint``)."""
    if not os.path.exists(model):
        return model
    parts = os.path.normpath(os.path.abspath(model)).split(os.sep)
    return "/".join(parts[-2:])


def _finish(config: EvalConfig, data: LoadedData, selected: Sequence[EvalItem], done: Mapping[str, Any],
            answered: int) -> EvalResult:
    from .plot import plot_summary

    summary = summarise(selected, done, data.bad_rows, config.circular, data.notes)
    summary["settings"] = {k: v for k, v in asdict(config).items() if k not in ("progress", "retry_errors")}
    title = f"{_model_name(config.model)} on {os.path.basename(config.data)}"
    paths = write_summary(summary, config.out, title)
    paths["chart"] = plot_summary(summary, os.path.join(config.out, CHART_FILE), title)
    paths["predictions"] = PredictionStore(config.out).path
    return EvalResult(summary, markdown_table(summary, title), paths, answered)
