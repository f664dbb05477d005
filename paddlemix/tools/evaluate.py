"""Evaluate an InternLM-XComposer2 checkpoint: accuracy overall and per category, with the official prompts.

    python paddlemix/tools/evaluate.py -m ./checkpoints/my-sft --data eval.json --out results/
    python paddlemix/tools/evaluate.py -m internlm/internlm-xcomposer2-vl-7b --source huggingface \\
        --data MMBench_DEV_EN.tsv --circular --out results/mmbench

Formats: our chatml JSON/JSONL (the last answer is the reference), MMBench-style TSV as VLMEvalKit
ships it (base64 images), ScienceQA-style rows with options (JSON/JSONL, or VLMEvalKit's TSV).
Predictions are appended to OUT/predictions.jsonl as they come: rerun the same command after an
interruption and it resumes where it stopped. OUT also gets summary.json, summary.md, summary.png.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Any, Callable, List, Optional, Tuple

from paddlemix.cli_utils import (DTYPES, HUB_SOURCES, add_logging_args, load_model, pick_device, pick_dtype, run_cli,
                                 setup_logging)

FORMATS = ("auto", "chatml", "mmbench_tsv", "scienceqa")
SHOWN_BAD_ROWS = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--from_pretrained", "--model_name_or_path", dest="from_pretrained", required=True,
                   help="checkpoint directory or hub id")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: the model's)")
    p.add_argument("--data", required=True, help="the evaluation file (.json, .jsonl or .tsv)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="default: from the file (see above)")
    p.add_argument("--out", default="results", help="output directory (default: results)")
    p.add_argument("--batch_size", type=int, help="rows generated together (default 8)")
    p.add_argument("--max_new_tokens", type=int, help="default: 5 for benchmarks (official), 64 for chatml")
    p.add_argument("--num_beams", type=int, help="default: 5 for benchmarks (official), 1 for chatml")
    p.add_argument("--repetition_penalty", type=float, help="default: 1.0 for benchmarks (official), 1.005 "
                   "(model.chat's) for chatml")
    p.add_argument("--meta_instruction", help="chatml: system prompt (default: the official one; '' for none, as "
                   "the fine-tuning data has none)")
    p.add_argument("--prompt_style", choices=("official", "vlmevalkit"), default="official",
                   help="mmbench_tsv: 'official' (IXC2 script: an empty C/D column shows as 'nan') or 'vlmevalkit' "
                   "(empty options dropped)")
    p.add_argument("--extract", choices=("vlmevalkit", "official"), default="vlmevalkit",
                   help="answer extraction: VLMEvalKit's can_infer (letter, then option text; default) or the "
                   "official script's first A-D")
    p.add_argument("--circular", action="store_true", help="MMBench circular evaluation: right only if right with "
                   "every rotation of the options")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions (after --shuffle)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the questions first (with --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    p.add_argument("--image_root", help="folder relative image paths resolve against (default: the data file's)")
    p.add_argument("--split", help="scienceqa JSON: only rows of this split (e.g. test)")
    p.add_argument("--retry_errors", action="store_true", help="on a resume, ask again the rows whose earlier "
                   "answer was an error (e.g. an unreadable image, fixed since); by default they keep it")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, else float32")
    p.add_argument("--device", help="cpu, gpu, gpu:0, ... (default: gpu if available, else cpu)")
    p.add_argument("--source", choices=tuple(HUB_SOURCES), default="paddlenlp",
                   help="where to download hub ids from")
    p.add_argument("--cache_dir", help="download cache directory")
    add_logging_args(p)
    return p


def loader(args: argparse.Namespace, dtype: str) -> Callable[[], Tuple[Any, Any]]:
    """``load() -> (model, tokenizer)``, called only if some row still needs an answer."""
    return functools.partial(load_model, args.from_pretrained, dtype, args.source, args.cache_dir, args.tokenizer,
                             quiet=not args.verbose)


@run_cli
def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from paddlemix.evaluation import EvalConfig, run_evaluation

    dtype = pick_dtype(args.dtype, pick_device(args.device))
    batch = {"batch_size": args.batch_size} if args.batch_size is not None else {}  # else EvalConfig's
    config = EvalConfig(model=args.from_pretrained, data=args.data, out=args.out, format=args.format, **batch,
                        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                        repetition_penalty=args.repetition_penalty, meta_instruction=args.meta_instruction,
                        prompt_style=args.prompt_style, extract=args.extract, circular=args.circular,
                        limit=args.limit, shuffle=args.shuffle, seed=args.seed, image_root=args.image_root,
                        split=args.split, dtype=dtype, progress=not args.no_progress,
                        retry_errors=args.retry_errors)
    result = run_evaluation(config, loader(args, dtype))
    bad = result.summary["bad_rows"]
    for row in bad["rows"][:SHOWN_BAD_ROWS]:
        print(f"bad row: {row['location']}: {row['reason']}", file=sys.stderr)
    if bad["count"] > SHOWN_BAD_ROWS:
        print(f"... and {bad['count'] - SHOWN_BAD_ROWS} more bad rows (all in {result.paths['json']})", file=sys.stderr)
    print(result.table)
    print("written: " + ", ".join(result.paths[k] for k in ("predictions", "json", "markdown", "chart")))
    return 0


if __name__ == "__main__":
    main()
