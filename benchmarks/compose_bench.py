#!/usr/bin/env python
"""CPU timings of the composition pipeline on the bench configuration (``bench.py``'s 297 M model).

Figures (each: ``--runs`` timed runs after one warm-up; median/min/max):

* seconds per official step at its official budget: the article (``--article_tokens`` new tokens;
  the official 4096 would take minutes here), locations (200), one caption (200), one selection
  (10, 4 candidates after one chosen image); the weights are random, so no step stops early and
  each runs its whole budget (the worst case). The steps after the article run on a fixed
  ``--paragraphs``-paragraph article, so their prompt sizes are realistic;
* library ranking: seconds to score one caption against ``--library_size`` images;
* library encoding: images/s of a cold open (no cache), seconds of a warm one (everything cached),
  and the speed-up of warm over cold.

Writes ``benchmarks/results/<cpu kind>/compose.json`` (with the CPU model, threads and versions)::

    python benchmarks/compose_bench.py                 # the figures (several minutes)
    python benchmarks/compose_bench.py --quick         # a short check that it all runs (< 1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench  # noqa: E402  (sets the thread count before Paddle is imported)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from paddlemix.composition import prompts, steps  # noqa: E402
from paddlemix.composition.library import open_library  # noqa: E402
from paddlemix.composition.ranking import caption_scores  # noqa: E402

PARAGRAPH = "西湖位于杭州城西，三面环山，湖面碧波荡漾，四季景色各异，自古以来就是文人墨客吟咏的对象。"


def timed(fn: Callable[[], Any], runs: int) -> List[float]:
    """One warm-up call, then ``runs`` timed calls (seconds), with the machine's load recorded."""
    fn()
    values = []
    for i in range(runs):
        with bench.MachineLoad() as load:
            started = time.perf_counter()
            fn()
            values.append(time.perf_counter() - started)
        bench.log(f"    run {i + 1}/{runs}: {values[-1]:.3f} s (others {load.others_percent} % CPU)")
    return values


def step_figures(model, tokenizer, args) -> Dict[str, Any]:
    paragraphs = [f"{i + 1}. {PARAGRAPH}" for i in range(args.paragraphs)]
    images = model.encode_img([bench.IMG1, bench.IMG2, bench.IMG1, bench.IMG2, bench.IMG1])
    calls = {
        "article_s": lambda: steps.write_article(model, tokenizer, "写一篇介绍西湖四季风景的文章。",
                                                 max_new_tokens=args.article_tokens, do_sample=False),
        "locations_s": lambda: steps.locate_images(model, tokenizer, paragraphs, "2", do_sample=False),
        "caption_s": lambda: steps.caption_places(model, tokenizer, paragraphs, [args.paragraphs // 2],
                                                  do_sample=False),
        "selection_s": lambda: steps.choose_candidate(model, tokenizer, ["\n".join(paragraphs[:2]) + "\n",
                                                                         "\n".join(paragraphs[2:4]) + "\n"],
                                                      images[:1], images[1:], do_sample=False),
    }
    figures = {}
    for name, call in calls.items():
        bench.log(f"  {name}")
        figures[name] = bench.figure(timed(call, args.runs), "s", lower_is_better=True)
    return figures


def write_library(folder: str, count: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"photo{i:04d}.jpg"), quality=90)


def library_figures(model, tokenizer, args) -> Dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="compose-bench-")
    try:
        write_library(folder, args.library_size)
        cold, warm = [], []
        for i in range(args.runs):
            shutil.rmtree(os.path.join(folder, ".ixc2_cache"), ignore_errors=True)
            started = time.perf_counter()
            opened = open_library(model, folder, batch_size=args.batch_size, progress=False)
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = open_library(model, folder, batch_size=args.batch_size, progress=False)
            warm.append(time.perf_counter() - started)
            assert opened.stats.encoded == args.library_size and again.stats.encoded == 0
            bench.log(f"    run {i + 1}/{args.runs}: cold {cold[-1]:.2f} s, warm {warm[-1]:.3f} s")
        rank = timed(lambda: caption_scores(model, tokenizer, again, ["湖边的日落"], batch_size=args.batch_size),
                     args.runs)
        return {
            "encode_images_per_s": bench.figure([args.library_size / c for c in cold], "images/s"),
            "open_cold_s": bench.figure(cold, "s", lower_is_better=True),
            "open_warm_s": bench.figure(warm, "s", lower_is_better=True),
            "cache_speedup": bench.figure([c / w for c, w in zip(cold, warm)], "x"),
            "rank_one_caption_s": bench.figure(rank, "s", lower_is_better=True),
            "rank_images_per_s": bench.figure([args.library_size / r for r in rank], "images/s"),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (set before Paddle is imported)")
    parser.add_argument("--article_tokens", type=int, default=256)
    parser.add_argument("--paragraphs", type=int, default=6)
    parser.add_argument("--library_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny budgets and 1 run: checks that it works")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.article_tokens, args.paragraphs, args.library_size = 1, 8, 3, 8
        prompts.BUDGETS.update(locations=8, captions=8)  # not the official budgets: a smoke run only
    model, tokenizer = bench.build_model(bench.bench_config()), bench.tokenizer()
    figures = {**step_figures(model, tokenizer, args), **library_figures(model, tokenizer, args)}
    result = {
        "name": "compose", "figures": figures, "threads": bench.THREADS, "runs_count": args.runs,
        "settings": {k: getattr(args, k) for k in ("article_tokens", "paragraphs", "library_size", "batch_size",
                                                   "quick")},
        "step_budgets": dict(prompts.BUDGETS, article=args.article_tokens),
        "versions": bench.versions(), "machine": bench.machine_info(), "unix_time": int(time.time()),
        "note": "CPU, fp32, random weights (every step runs its whole budget). Quick runs are smoke tests only.",
    }
    os.makedirs(bench.RESULTS, exist_ok=True)
    path = os.path.join(bench.RESULTS, "compose-quick.json" if args.quick else "compose.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    bench.print_table("compose", result)
    bench.log(f"wrote {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
