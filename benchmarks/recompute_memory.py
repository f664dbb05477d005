"""Peak memory and time of one training step with and without gradient checkpointing
(``recompute``), bench configuration, a long text sample (``--tokens``, default 2048), all LLM
weights trainable. Each variant runs in a fresh process; peak RSS is ``VmHWM``.

Usage: ``python benchmarks/recompute_memory.py [--tokens 2048]``; writes
``benchmarks/results/recompute_memory.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _hwm() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(recompute: bool, tokens: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench  # the bench configuration and model builder

    import paddle

    model = bench.build_model(bench.bench_config())
    model.train()
    for name, param in model.named_parameters():
        param.stop_gradient = name.startswith("vit.")
    model.model.enable_recompute = recompute
    paddle.seed(0)
    ids = paddle.randint(3, 90000, [1, tokens])
    labels = ids.clone()
    base = _hwm()
    times = []
    for _ in range(2):  # the second step is timed (the first warms allocator and kernels)
        start = time.perf_counter()
        model(input_ids=ids, labels=labels).loss.backward()
        model.clear_gradients(set_to_zero=False)
        times.append(time.perf_counter() - start)
    print(json.dumps({"recompute": recompute, "peak_over_baseline": _hwm() - base, "step_s": times[-1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "on", args.tokens)
        return
    results = {"tokens": args.tokens}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", mode],
                             check=True, capture_output=True, text=True)
        results[f"recompute_{mode}"] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = results["recompute_off"], results["recompute_on"]
    print(f"{args.tokens} tokens, bench config, full fine-tuning (fp32, CPU):")
    for label, r in (("without recompute", off), ("with recompute", on)):
        print(f"  {label:18s} peak +{r['peak_over_baseline'] / 1e9:.2f} GB, step {r['step_s']:.2f} s")
    out_file = Path(__file__).parent / "results" / "recompute_memory.json"
    out_file.parent.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
