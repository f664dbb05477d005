#!/usr/bin/env python
"""Throughput of the OpenAI-compatible server under 1, 4 and 8 concurrent clients (CPU).

The bench configuration model of ``bench.py`` (297 M parameters, random weights) is served
in-process by uvicorn on 127.0.0.1; N threads of a child process (so that their parsing does not
compete for the server's GIL), each an official ``openai`` client, send the same image question at once (``<ImageHere>Describe the image.`` with ``img1.png`` as a data URL),
greedy, a fixed ``max_tokens``, streamed with ``include_usage``. Per N:

* aggregate decode tokens/s = Σ (completion tokens − 1) / (last token of any client − the latest
  first token): the decode phase, as ``bench.py decode-image`` defines it for one client (each
  client gets its first token as its own prefill ends; the batch decodes once all are prefilled);
* time to first token (TTFT) per client, request sent → first content chunk (queueing, image
  decode, ViT, the prefills of the rows before it in its batch and its own);
* end-to-end tokens/s = Σ completion tokens / (last token − first request).

Results: ``benchmarks/results/<cpu kind>/serve.json`` (as ``bench.py``). It also times the model alone (``generate_rows`` on b identical prompts, no HTTP) to
separate per-step model cost from server overhead. Target: ≥ 2.5× the single-client decode
throughput at 4 clients (CPU decode is memory-bound: a batch reads the weights once per step,
which on a CPU takes the packed weights of ``--cpu_weight_packing``, ``serving/packing.py``).

    python benchmarks/serve_bench.py                 # 1/4/8 clients, 3 runs each, 64 tokens
    python benchmarks/serve_bench.py --weight-packing off   # the same without the packed copy
    python benchmarks/serve_bench.py --quick         # a short check that it works
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

MODEL_NAME = "ixc2-bench"
TARGET_SPEEDUP_AT_4 = 2.5
CLIENTS_COMMAND = "_clients"  # the child process that runs the clients (no Paddle in it)
IMAGE_TEXT = "Describe the image."  # bench.py's IMAGE_QUERY without its <ImageHere> tag


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def messages(image: str) -> List[Dict[str, Any]]:
    with open(image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": IMAGE_TEXT}]}]


# --- the clients (a child process: their JSON parsing must not compete for the server's GIL) ----
def one_client(base_url: str, image: str, max_tokens: int, barrier: threading.Barrier, out: List[Any],
               i: int) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=600)
    body = messages(image)
    barrier.wait()
    start = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=body, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    out[i] = {"start": start, "first": first, "last": last, "tokens": tokens}


def run_clients(base_url: str, image: str, clients: int, max_tokens: int) -> None:
    """In the child: ``clients`` threads start together; prints their timings as JSON."""
    out: List[Any] = [None] * clients
    barrier = threading.Barrier(clients)
    threads = [threading.Thread(target=one_client, args=(base_url, image, max_tokens, barrier, out, i))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(out))


def one_run(base_url: str, image: str, clients: int, max_tokens: int) -> Dict[str, float]:
    child = subprocess.run([sys.executable, os.path.abspath(__file__), CLIENTS_COMMAND, base_url, image,
                            str(clients), str(max_tokens)], capture_output=True, text=True, check=True)
    out = json.loads(child.stdout.strip().splitlines()[-1])
    first, last = max(r["first"] for r in out), max(r["last"] for r in out)
    tokens = [r["tokens"] for r in out]
    return {"decode_tps": sum(n - 1 for n in tokens) / (last - first),
            "e2e_tps": sum(tokens) / (last - min(r["start"] for r in out)),
            "ttft_s": statistics.median(r["first"] - r["start"] for r in out),
            "ttft_max_s": max(r["first"] - r["start"] for r in out),
            "tokens": sum(tokens) / clients}


# --- the server side ----------------------------------------------------------------------------
def model_step_ms(model, tokenizer, batch: int, new_tokens: int) -> float:
    """Median decode step on ``batch`` identical image prompts (no server), on the server's path
    (``generate_rows``: each prompt prefilled alone; one prompt: ``generate_tokens``)."""
    from bench import IMAGE_QUERY, IMG1
    from paddlemix.models.internlm_xcomposer2.generation import generate_rows, seen_ids
    from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION

    rows = [model._chat_inputs(tokenizer, IMAGE_QUERY, [IMG1], [], DEFAULT_META_INSTRUCTION) for _ in range(batch)]
    settings = model._settings(tokenizer, max_new_tokens=new_tokens, do_sample=False)
    seen = seen_ids([model._official_prefix(tokenizer, layout) for layout, _, _ in rows])
    steps = generate_rows(model, [(embeds, im_mask) for _, embeds, im_mask in rows], settings, seen)
    stamps = [time.perf_counter() for _ in steps]
    return 1000 * statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def measure(args: argparse.Namespace, model, tokenizer) -> Dict[str, Any]:
    import bench
    from paddlemix.serving.runner import ServerThread, build_server

    # the weights were packed (or not) once, before the model-alone steps: the engine leaves them
    app, engine = build_server(model, tokenizer, MODEL_NAME, max_batch_size=max(args.clients),
                               max_queue=max(args.clients), batch_wait=args.batch_wait_ms / 1000,
                               weight_packing="off")
    batches: List[int] = []
    engine.on_batch = lambda jobs: batches.append(len(jobs))
    per_clients: Dict[int, List[Dict[str, float]]] = {}
    try:
        with ServerThread(app) as url:
            one_run(url, bench.IMG1, 1, min(8, args.max_tokens))  # warm-up
            for n in args.clients:
                per_clients[n] = []
                for r in range(args.runs):
                    batches.clear()
                    stats = engine.stats
                    before = (stats.steps, stats.model_seconds, stats.host_seconds, stats.prefill_seconds)
                    children, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                    with bench.MachineLoad() as load:
                        figures = one_run(url, bench.IMG1, n, args.max_tokens)
                    # the clients' own process is not "the rest of the machine": take its CPU out
                    clients = resource.getrusage(resource.RUSAGE_CHILDREN)
                    clients_cpu = clients.ru_utime + clients.ru_stime - children.ru_utime - children.ru_stime
                    clients_percent = 100 * clients_cpu / ((time.perf_counter() - wall) * (os.cpu_count() or 1))
                    steps = max(stats.steps - before[0], 1)
                    figures.update(others_cpu_percent=max(0.0, load.others_percent - clients_percent),
                                   clients_cpu_percent=clients_percent, batch_sizes=list(batches),
                                   served_model_ms_per_step=1000 * (stats.model_seconds - before[1]) / steps,
                                   served_host_ms_per_step=1000 * (stats.host_seconds - before[2]) / steps,
                                   served_prefill_s=(stats.prefill_seconds - before[3]) / max(len(batches), 1))
                    per_clients[n].append(figures)
                    bench.log(f"  {n} client(s), run {r + 1}/{args.runs}: " + ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    finally:
        engine.stop()
    return per_clients


def summarise(per_clients: Dict[int, List[Dict[str, float]]], steps: Dict[int, float]) -> Dict[str, Any]:
    from bench import figure

    figures: Dict[str, Any] = {}
    for n, runs in per_clients.items():
        figures[f"decode_tps_{n}_clients"] = figure([r["decode_tps"] for r in runs], "tok/s")
        figures[f"e2e_tps_{n}_clients"] = figure([r["e2e_tps"] for r in runs], "tok/s")
        figures[f"ttft_s_{n}_clients"] = figure([r["ttft_s"] for r in runs], "s", lower_is_better=True)
    single = figures.get("decode_tps_1_clients", {}).get("median")
    for n in per_clients:
        if single and n > 1:
            figures[f"decode_speedup_{n}_clients"] = figure(
                [r["decode_tps"] / single for r in per_clients[n]], "x",
                target=TARGET_SPEEDUP_AT_4 if n == 4 else None)
    for b, ms in steps.items():
        figures[f"model_step_ms_batch_{b}"] = {"unit": "ms", "median": ms, "min": ms, "max": ms, "runs": [ms],
                                               "model_tps": 1000 * b / ms}
    return {"figures": figures, "runs": {str(n): runs for n, runs in per_clients.items()},
            "others_cpu_percent": None}


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CLIENTS_COMMAND]:
        url, image, clients, max_tokens = argv[1:]
        run_clients(url, image, int(clients), int(max_tokens))
        return
    import bench  # sets the thread count and the CPU settings before Paddle is imported: first

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per client count (after one warm-up)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=50.0, help="the server's --batch_wait_ms")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (set before Paddle is imported)")
    parser.add_argument("--weight-packing", choices=("auto", "on", "off"), default="auto",
                        help="the server's --cpu_weight_packing (off: measure without the packed copy)")
    parser.add_argument("--quick", action="store_true", help="1 run each, 16 tokens: only checks that it works")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.max_tokens = 1, 16
    from paddlemix.serving.packing import pack_model

    model, tokenizer = bench.build_model(bench.bench_config()), bench.tokenizer()
    packed_bytes = pack_model(model, max(args.clients), args.weight_packing)  # as the server would
    model_step_ms(model, tokenizer, 1, 4)  # warm-up: the first generation of a process is slow
    steps = {b: model_step_ms(model, tokenizer, b, args.max_tokens) for b in sorted(set([1, *args.clients]))}
    bench.log("model alone, decode step: " + ", ".join(f"batch {b}: {ms:.1f} ms" for b, ms in steps.items()))
    result = summarise(measure(args, model, tokenizer), steps)
    result.update(max_tokens=args.max_tokens, batch_wait_ms=args.batch_wait_ms, lscpu_model_name=lscpu_model(),
                  weight_packing=args.weight_packing, packed_bytes=packed_bytes,
                  prompt="<ImageHere>Describe the image. + img1.png (data URL), greedy, streamed")
    result.pop("others_cpu_percent")
    if args.quick:  # a check, not a measurement: nothing is written
        bench.print_table("serve (quick check)", result)
    else:
        bench.write_result("serve" if args.weight_packing == "auto" else f"serve-packing-{args.weight_packing}",
                           result, args)


if __name__ == "__main__":
    main()
