#!/usr/bin/env python
"""CPU benchmarks of the InternLM-XComposer2 port on the fixed *bench configuration*.

Bench configuration (random weights seeded with ``paddle.seed(0)``, PLoRA B set to small
random values so the PLoRA branch does real work): LLM hidden 1024, 8 layers, 16 heads /
8 kv heads, intermediate 2816, vocab 92544, RoPE as the 7B; PLoRA r = alpha = 64; ViT
hidden 256, 4 layers, 4 heads, intermediate 1024, patch 14 at img_size 224 (256 image
tokens); projector 256→1024→1024; float32.

Sub-commands (each: a warm-up, then ``--runs`` timed runs, a median/min/max table on
stdout, and ``benchmarks/results/<name>.json``)::

    python benchmarks/bench.py decode-image        # image chat, greedy, 64 new tokens
    python benchmarks/bench.py decode-text         # text-only chat, greedy, 64 new tokens
    python benchmarks/bench.py prefill             # image chat, time to the first token
    python benchmarks/bench.py train-step --trainable full|plora --batch 1|4
    python benchmarks/bench.py load                # from_pretrained of HF safetensors, in a child process
    python benchmarks/bench.py overhead            # 32 tiny layers: per layer-token overhead
    python benchmarks/bench.py bandwidth           # numpy copy of 1 GiB → decode bound
    python benchmarks/bench.py gemm                # best fp32 GEMM rate here (NumPy's BLAS, Paddle) → prefill bound
    python benchmarks/bench.py all                 # everything above, each in a fresh process

The thread count is fixed *before* Paddle is imported (``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS``, then ``paddle.base.core.set_num_threads``); default 2. So are the CPU-vendor
settings every entry point applies (``paddlemix/cpu_env.py``: on a non-Intel CPU, MKL's code path
by instruction set); ``--mkl-default`` measures without them. Results go to
``benchmarks/results/<cpu>/`` (one folder per CPU kind: vendor, model, AVX-512 or not) and carry
the machine's own bounds: copy bandwidth (decode) and best GEMM rate (prefill).
These are CPU measurements on whatever machine runs them; other processes running at
the same time skew them (each result records how busy the rest of the machine was).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional


def _early_threads(argv: List[str]) -> int:
    """``--threads N`` from the command line, read before Paddle is imported."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 2


THREADS = _early_threads(sys.argv)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
os.environ["MKL_NUM_THREADS"] = str(THREADS)
os.environ.setdefault("GLOG_minloglevel", "2")
MKL_DEFAULT = "--mkl-default" in sys.argv
if MKL_DEFAULT:
    os.environ["IXC2_CPU_TUNING"] = "0"
PLAIN_KERNELS = "--plain-kernels" in sys.argv  # the kernels an AVX2-only CPU takes, on this CPU

from paddlemix import cpu_env  # noqa: E402  (no Paddle import)
from paddlemix.cpu_env import configure_allocator, configure_cpu_environment, cpu_info  # noqa: E402

configure_cpu_environment()  # as every entry point does, before Paddle loads
if "train-step" in sys.argv:
    configure_allocator()  # as the training entry points do (paddlemix/cpu_env.py)

import warnings  # noqa: E402

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import paddle  # noqa: E402

paddle.base.core.set_num_threads(THREADS)
if PLAIN_KERNELS:
    from paddlemix.models.internlm_xcomposer2.kernels import set_fused_kernels_on_cpu  # noqa: E402

    set_fused_kernels_on_cpu(False)

import paddlenlp  # noqa: E402

from paddlemix.models.internlm_xcomposer2.configuration import InternLMXComposer2Config  # noqa: E402
from paddlemix.models.internlm_xcomposer2.modeling import InternLMXComposer2ForCausalLM  # noqa: E402
from paddlemix.models.internlm_xcomposer2.row_gemm import row_gemm  # noqa: E402
from paddlemix.models.internlm_xcomposer2.tokenizer import InternLMXComposer2Tokenizer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_kind() -> str:
    """The results folder of this CPU: vendor, model, ISA (e.g. ``amd-epyc-7763-avx2``); where the
    model name carries no model number (VMs show "AMD EPYC", "Intel(R) Xeon(R) Processor"), the
    CPU family and model instead (``amd-epyc-25-1-avx2``): two generations must not share one."""
    info = cpu_info()
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(str(info.get("vendor")), "cpu")
    words = [w for w in str(info.get("model", "")).lower().replace("(r)", "").replace("(tm)", "").split()
             if w not in ("intel", "amd", "processor", "cpu", "core") and w.replace("-", "").isalnum()
             and not w.endswith("ghz")][:2]
    if not any(c.isdigit() for c in "".join(words)) and info.get("family_model"):
        words.append(str(info["family_model"]))
    isa = "avx512" if "avx512f" in info.get("flags", frozenset()) else "avx2"
    return "-".join([vendor, *words, isa] + (["mkl-default"] if MKL_DEFAULT else [])
                    + (["plain-kernels"] if PLAIN_KERNELS else []))


RESULTS = os.path.join(HERE, "results", cpu_kind())
FIXTURE = os.environ.get("IXC2_BENCH_FIXTURE", os.path.join(os.path.dirname(HERE), "..", "shared", "fixtures", "ixc2-tiny"))
if not os.path.isdir(FIXTURE):
    FIXTURE = "/work/shared/fixtures/ixc2-tiny"
IMG1 = os.path.join(FIXTURE, "img1.png")  # 300×200
IMG2 = os.path.join(FIXTURE, "img2.png")  # 180×260

IMAGE_QUERY = "<ImageHere>Describe the image."
TEXT_QUERY = "Tell me a short story about a cat who learns to fly."
NEW_TOKENS = 64

# The official implementation (PyTorch remote code, transformers 4.33.2, torch CPU, fp32,
# 2 threads) on this machine type, bench configuration: shared/MEASUREMENTS.md.
OFFICIAL = {
    "prefill_s": 1.097,
    "decode_image_tps": 16.8,
    "decode_text_tps": 1.75,  # the official text path has no KV cache
    "decode_text_tps_cache_forced": 17.3,
    "train_full_s": 5.47,
    "train_plora_s": 3.61,
    "train_full_rss_gb": 4.1,
    "train_plora_rss_gb": 3.3,
    "load_peak_rss_gb": 2.74,
    "overhead_ms_per_token": 22.8,
    "overhead_us_per_layer_token": 711.0,
    "copy_bandwidth_gbps": 27.5,
}
TARGETS = {
    "decode_image_tps": 25.0,
    "decode_image_fraction_of_bound": 0.85,
    "prefill_over_gemm_bound": 1.3,
    "decode_text_tps": 25.0,
    "prefill_s": 0.85,
    "train_full_s": 5.5,
    "train_plora_s": 3.6,
    "batch4_tokens_per_s_ratio": 1.5,
    "load_peak_rss_over_param_bytes": 1.2,
    "load_s": 1.5,
    "overhead_us_per_layer_token": 150.0,
    # none inside the forward (layers, head): the "no sync per layer". The loop's one per
    # step (the chosen ids; greedy on a CPU, the last logits) is needed to stream and to stop.
    "overhead_syncs_in_forward_per_token": 0,
}


# --- configurations --------------------------------------------------------------------------
def bench_config() -> InternLMXComposer2Config:
    return InternLMXComposer2Config(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=2816, lora_r=64, lora_alpha=64,
        vision_config={"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                       "intermediate_size": 1024, "patch_size": 14, "image_size": 336},
        img_size=224,
    )


def overhead_config() -> InternLMXComposer2Config:
    """Overhead-bound: 32 thin layers, so per-op Python/dispatch cost dominates."""
    return InternLMXComposer2Config(
        hidden_size=64, num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=224, lora_r=8, lora_alpha=8,
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 64, "patch_size": 14, "image_size": 336},
        img_size=224,
    )


def build_model(config: InternLMXComposer2Config, plora_b_std: float = 0.01):
    """The model under ``paddle.seed(0)``; Plora_B (zero at init) set to N(0, std²) so the
    PLoRA branch changes the output."""
    t0 = time.perf_counter()
    paddle.seed(0)
    model = InternLMXComposer2ForCausalLM(config)
    paddle.seed(1)
    for name, param in model.named_parameters():
        if "Plora_B" in name:
            param.set_value(paddle.randn(param.shape, dtype=param.dtype) * plora_b_std)
    model.eval()
    log(f"built the model in {time.perf_counter() - t0:.1f} s ({param_count(model) / 1e6:.1f} M parameters)")
    return model


def param_count(model) -> int:
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


def param_bytes(model) -> int:
    return int(sum(int(np.prod(p.shape)) * p.element_size() for p in model.parameters()))


def decode_bytes_per_token(config: InternLMXComposer2Config, dtype_bytes: int = 4) -> int:
    """Weight bytes one decode step must read, PLoRA excluded (generated tokens are text):
    every layer's wqkv, wo, w1, w3, w2 and both norms, the final norm, the output head and
    one embedding row."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    per_layer = h * qkv + h * h + 3 * h * i + 2 * h
    return dtype_bytes * (config.num_hidden_layers * per_layer + h + v * h + h)


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = InternLMXComposer2Tokenizer.from_pretrained(FIXTURE)
    return _TOKENIZER


# --- measurement helpers ---------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MachineLoad:
    """CPU time the *rest* of the machine used while a section ran, as a percentage of all
    cores (0 = nothing else ran). Benchmarks on a shared machine are only as good as this."""

    def __enter__(self):
        self._sys = psutil.cpu_times()
        self._me = psutil.Process().cpu_times()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sys_now, me_now = psutil.cpu_times(), psutil.Process().cpu_times()
        busy = lambda c: c.user + c.nice + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0)  # noqa: E731
        mine = (me_now.user + me_now.system + me_now.children_user + me_now.children_system) - (
            self._me.user + self._me.system + self._me.children_user + self._me.children_system)
        wall = time.perf_counter() - self._t
        others = max(0.0, busy(sys_now) - busy(self._sys) - mine)
        self.others_percent = round(100.0 * others / (wall * psutil.cpu_count()), 1) if wall > 0 else 0.0
        return False


class RSSPeak:
    """Peak resident set size of this process during a section (polled every 10 ms)."""

    def __enter__(self):
        self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)
        return False


def wait_for_idle(max_wait: float, threshold: float = 15.0) -> None:
    """Wait (at most ``max_wait`` s) until the machine's CPU use over 1 s is below ``threshold`` %."""
    if max_wait <= 0:
        return
    deadline = time.time() + max_wait
    while time.time() < deadline:
        if psutil.cpu_percent(interval=1.0) < threshold:
            return
    log(f"machine still busy after waiting {max_wait:.0f} s; measuring anyway")


def stats(values: List[float]) -> Dict[str, float]:
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def repeat(fn: Callable[[], Dict[str, float]], runs: int, warmup: int, idle_wait: float) -> List[Dict[str, float]]:
    """``warmup`` untimed calls, then ``runs`` calls of ``fn`` (each returns its figures)."""
    for _ in range(warmup):
        fn()
    out = []
    for i in range(runs):
        wait_for_idle(idle_wait)
        with MachineLoad() as load:
            figures = fn()
        figures["others_cpu_percent"] = load.others_percent
        out.append(figures)
        log(f"  run {i + 1}/{runs}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    return out


def machine_info() -> Dict[str, Any]:
    from paddlemix.models.internlm_xcomposer2.kernels import fused_kernels_on_cpu

    info = cpu_info()
    flags = info.get("flags", frozenset())
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    return {
        "cpu_model": info.get("model", "unknown"),
        "cpu_vendor": info.get("vendor", "unknown"),
        "cpu_kind": cpu_kind(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "lscpu_model_name": next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                  if line.startswith("Model name")), None),
        "lscpu_cpu_family_model": [line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                   if line.startswith(("CPU family", "Model:"))],
        "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
        "kmp_blocktime": os.environ.get("KMP_BLOCKTIME"),
        "malloc_keeps_freed_memory": "allocator" in cpu_env.applied,
        "row_gemm": row_gemm(),
        "fused_cpu_kernels": fused_kernels_on_cpu(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
    }


def versions() -> Dict[str, str]:
    return {"paddle": paddle.__version__, "paddlenlp": paddlenlp.__version__, "python": platform.python_version(),
            "numpy": np.__version__}


def measure_copy_bandwidth(runs: int = 7, gib: float = 1.0) -> Dict[str, Any]:
    """numpy copy of ``gib`` GiB; bandwidth counts bytes read + written (as the official figure)."""
    n = int(gib * 2**30) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    del src, dst
    bw = [2 * n * 4 / t / 1e9 for t in times]
    return {"gbps": stats(bw), "runs_gbps": bw, "bytes_copied": n * 4}


_BANDWIDTH: Optional[Dict[str, Any]] = None
IDLE_WAIT = 2.0  # set from --idle-wait


def bandwidth(runs: int = 5) -> Dict[str, Any]:
    """The copy bandwidth measured once per process (every result carries it)."""
    global _BANDWIDTH
    if _BANDWIDTH is None:
        wait_for_idle(IDLE_WAIT)
        with MachineLoad() as load:
            _BANDWIDTH = measure_copy_bandwidth(runs)
        _BANDWIDTH["others_cpu_percent"] = load.others_percent
    return _BANDWIDTH


# The prefill's largest GEMM: 405 tokens × hidden 1024 × intermediate 2816 (w1, w3 of the bench config).
GEMM_SHAPE = (405, 1024, 2816)
_GEMM: Optional[Dict[str, Any]] = None


def measure_gemm(runs: int = 7) -> Dict[str, Any]:
    """fp32 GEMM rate at ``GEMM_SHAPE``, at this process's threads, with NumPy's BLAS and with
    Paddle (MKL): the best is the machine's rate the prefill is held to."""
    m, k, n = GEMM_SHAPE
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
    rates = {}
    for lib, fn in (("numpy", lambda: a @ b), ("paddle", lambda: paddle.matmul(pa, pb).numpy())):
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rates[lib] = 2 * m * k * n / statistics.median(times) / 1e9
    return {"shape": list(GEMM_SHAPE), "gflops": rates, "best_gflops": max(rates.values()),
            "best_library": max(rates, key=rates.get)}


def gemm_bound() -> Dict[str, Any]:
    """The GEMM rate measured once per process (prefill results carry it)."""
    global _GEMM
    if _GEMM is None:
        wait_for_idle(IDLE_WAIT)
        with MachineLoad() as load:
            _GEMM = measure_gemm()
        _GEMM["others_cpu_percent"] = load.others_percent
    return _GEMM


def prefill_flops(config: InternLMXComposer2Config, tokens: int, image_tokens: int, images: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of an image chat's prefill: ViT + projector over the images,
    the decoder over ``tokens`` (attention over all of them, PLoRA on the image rows) and the head
    on the last position only. Elementwise work is not counted: the bound is GEMM-only."""
    v = config.vision
    patches = (config.img_size // v.patch_size) ** 2
    vit = images * (2 * patches * 3 * v.patch_size ** 2 * v.hidden_size + v.num_hidden_layers * (
        2 * (patches + 1) * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        + 4 * (patches + 1) ** 2 * v.hidden_size))
    h, inter = config.hidden_size, config.intermediate_size
    projector = 2 * images * patches * (v.hidden_size * h + (config.projector_depth - 1) * h * h)
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    linears = [(h, qkv), (h, h), (h, inter), (h, inter), (inter, h)]
    dense = 2 * tokens * sum(i * o for i, o in linears)
    plora = 2 * image_tokens * sum(config.lora_r * (i + o) for i, o in linears)
    attention = 4 * tokens * tokens * config.num_attention_heads * config.head_dim
    llm = config.num_hidden_layers * (dense + plora + attention)
    return float(vit + projector + llm + 2 * h * config.vocab_size)


def decode_bound(config: InternLMXComposer2Config) -> Dict[str, float]:
    bw = bandwidth()["gbps"]["median"]
    per_token = decode_bytes_per_token(config)
    return {"weight_bytes_per_token": per_token, "copy_bandwidth_gbps": bw,
            "bound_tokens_per_s": bw * 1e9 / per_token}


def add_quiet_stats(result: Dict[str, Any], threshold: float = 10.0) -> None:
    """Per figure, the median over the runs during which other processes used < ``threshold`` %
    of the CPUs (``quiet_median``, ``quiet_runs``): the figure to trust on a shared machine."""
    loads = result.get("others_cpu_percent")
    if not loads:
        return
    for fig in result["figures"].values():
        runs = fig.get("runs", [])
        if len(runs) != len(loads):
            continue
        quiet = [v for v, load in zip(runs, loads) if load < threshold]
        fig["quiet_runs"] = len(quiet)
        fig["quiet_median"] = float(statistics.median(quiet)) if quiet else None


def write_result(name: str, result: Dict[str, Any], args) -> Dict[str, Any]:
    add_quiet_stats(result)
    result = {
        "name": name,
        **result,
        "threads": THREADS,
        "runs_count": args.runs,
        "versions": versions(),
        "machine": machine_info(),
        "copy_bandwidth": bandwidth(),
        "unix_time": int(time.time()),
        "note": "CPU measurement on this machine; fp32; random weights. others_cpu_percent = share of all "
                "cores used by other processes during a run (noise).",
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print_table(name, result)
    log(f"wrote {os.path.relpath(path)}")
    return result


def print_table(name: str, result: Dict[str, Any]) -> None:
    print(f"\n== {name} ==  ({THREADS} threads)")
    print(f"{'figure':34s} {'median':>10s} {'min':>10s} {'max':>10s} {'quiet med':>10s} {'official':>10s} "
          f"{'ratio':>7s} {'target':>9s}")
    for key, fig in result["figures"].items():
        official = fig.get("official")
        ratio = fig.get("vs_official")
        target = fig.get("target")
        quiet = fig.get("quiet_median")
        print(f"{key + ' [' + fig['unit'] + ']':34s} {fig['median']:10.4g} {fig['min']:10.4g} {fig['max']:10.4g} "
              f"{'' if quiet is None else format(quiet, '10.4g'):>10s} "
              f"{'' if official is None else format(official, '10.4g'):>10s} "
              f"{'' if ratio is None else format(ratio, '7.2f'):>7s} "
              f"{'' if target is None else (('<=' if fig.get('lower_is_better') else '>=') + format(target, '.4g')):>9s}")
    for key, value in result.items():
        if key in ("bound", "notes") or (key not in ("figures", "runs_count", "threads", "unix_time")
                                         and isinstance(value, (int, float, bool))):
            print(f"{key}: {value}")


def figure(values: List[float], unit: str, official: Optional[float] = None, target: Optional[float] = None,
           lower_is_better: bool = False, bound: Optional[float] = None) -> Dict[str, Any]:
    """A figure's stats plus ``vs_official`` (>1 = better than official) and ``vs_bound``."""
    s = stats(values)
    out: Dict[str, Any] = {"unit": unit, **s, "runs": values, "lower_is_better": lower_is_better}
    if official is not None:
        out["official"] = official
        out["vs_official"] = (official / s["median"]) if lower_is_better else (s["median"] / official)
    if bound is not None:
        out["bound"] = bound
        out["vs_bound"] = (bound / s["median"]) if lower_is_better else (s["median"] / bound)
    if target is not None:
        out["target"] = target
        out["meets_target"] = (s["median"] <= target) if lower_is_better else (s["median"] >= target)
    return out


# --- chat timings ---------------------------------------------------------------------------
class TokenClock:
    """A ``streamer`` for ``chat``: timestamps every new token (the first ``put`` is the ids
    generation starts from, as transformers' streamers get them: skipped)."""

    def __init__(self):
        self.times: List[float] = []
        self.started = False

    def put(self, _ids) -> None:
        if self.started:
            self.times.append(time.perf_counter())
        self.started = True

    def end(self) -> None:
        pass


def timed_chat(model, query: str, image: Optional[str], new_tokens: int) -> Dict[str, float]:
    """One greedy ``chat`` call (official defaults otherwise: repetition penalty 1.005).
    prefill = call → first token (tokenize, image preprocessing, ViT, projector, prefill
    forward, first choice); decode = tokens after the first / time between first and last."""
    clock = TokenClock()
    t0 = time.perf_counter()
    model.chat(tokenizer(), query, image=image, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
    t_end = time.perf_counter()
    n = len(clock.times)
    out = {"prefill_s": clock.times[0] - t0, "total_s": t_end - t0, "new_tokens": float(n)}
    if n > 1:
        out["decode_tps"] = (n - 1) / (clock.times[-1] - clock.times[0])
    return out


def cmd_decode(model, args, image: bool) -> Dict[str, Any]:
    name = "decode-image" if image else "decode-text"
    log(f"{name}: chat, greedy, {NEW_TOKENS} new tokens")
    query, img = (IMAGE_QUERY, IMG1) if image else (TEXT_QUERY, None)
    runs = repeat(lambda: timed_chat(model, query, img, NEW_TOKENS), args.runs, 1, args.idle_wait)
    bound = decode_bound(model.config)
    tps = [r["decode_tps"] for r in runs]
    key = "decode_image_tps" if image else "decode_text_tps"
    figures = {
        "decode_tokens_per_s": figure(tps, "tok/s", OFFICIAL[key], TARGETS[key], bound=bound["bound_tokens_per_s"]),
        "ms_per_token": figure([1e3 / v for v in tps], "ms", 1e3 / OFFICIAL[key], lower_is_better=True,
                               bound=1e3 / bound["bound_tokens_per_s"]),
        "prefill_s": figure([r["prefill_s"] for r in runs], "s",
                            OFFICIAL["prefill_s"] if image else None, lower_is_better=True),
        "total_s": figure([r["total_s"] for r in runs], "s", lower_is_better=True),
    }
    result = {"figures": figures, "bound": bound, "new_tokens": [r["new_tokens"] for r in runs],
              "others_cpu_percent": [r["others_cpu_percent"] for r in runs],
              "query": query, "image": os.path.basename(img) if img else None}
    if image:
        frac = [v / bound["bound_tokens_per_s"] for v in tps]
        figures["fraction_of_bound"] = figure(frac, "x", target=TARGETS["decode_image_fraction_of_bound"])
    else:
        figures["decode_tokens_per_s"]["official_cache_forced"] = OFFICIAL["decode_text_tps_cache_forced"]
        figures["decode_tokens_per_s"]["vs_official_cache_forced"] = (
            figures["decode_tokens_per_s"]["median"] / OFFICIAL["decode_text_tps_cache_forced"])
        result["notes"] = "the official text-only chat has no KV cache (1.75 tok/s); 17.3 tok/s with a cache forced"
    return write_result(name, result, args)


def cmd_prefill(model, args) -> Dict[str, Any]:
    log("prefill: image chat, time to the first token")
    runs = repeat(lambda: timed_chat(model, IMAGE_QUERY, IMG1, 1), args.runs, 1, args.idle_wait)
    layout_len = prompt_length(model, IMAGE_QUERY, 1)
    gemm = gemm_bound()
    flops = prefill_flops(model.config, layout_len, model.config.num_image_tokens, 1)
    bound_s = flops / (gemm["best_gflops"] * 1e9)
    seconds = [r["prefill_s"] for r in runs]
    figures = {"prefill_s": figure(seconds, "s", OFFICIAL["prefill_s"], TARGETS["prefill_s"], lower_is_better=True,
                                   bound=bound_s),
               "over_gemm_bound": figure([t / bound_s for t in seconds], "x", target=TARGETS["prefill_over_gemm_bound"],
                                         lower_is_better=True)}
    return write_result("prefill", {"figures": figures, "prompt_tokens": layout_len, "gemm": gemm,
                                    "bound": {"prefill_gflop": flops / 1e9, "best_gemm_gflops": gemm["best_gflops"],
                                              "bound_s": bound_s},
                                    "others_cpu_percent": [r["others_cpu_percent"] for r in runs]}, args)


def cmd_gemm(args) -> Dict[str, Any]:
    global _GEMM
    _GEMM = None
    gemm = gemm_bound()
    figures = {lib: figure([rate], "GFLOP/s") for lib, rate in gemm["gflops"].items()}
    return write_result("gemm", {"figures": figures, "gemm": gemm,
                                 "notes": f"fp32 {GEMM_SHAPE[0]}x{GEMM_SHAPE[1]} @ {GEMM_SHAPE[1]}x{GEMM_SHAPE[2]}, "
                                          "median of 7, at the benchmark's threads"}, args)


def prompt_length(model, query: str, num_images: int) -> int:
    from paddlemix.models.internlm_xcomposer2.processor import InternLMXComposer2Processor

    processor = InternLMXComposer2Processor.from_config(tokenizer(), model.config)
    return len(processor.chat_layout(query, (), num_images))


# --- training step --------------------------------------------------------------------------
# Two turns, two images: 56 text tokens + 2 × 256 image tokens = 568 tokens (as the official figure).
TRAIN_CONVERSATION = [
    ("<ImageHere>What is in the first picture?", "A small scene with a few simple shapes and colours."),
    ("<ImageHere>How does the second picture differ?", "It is taller, with other colours."),
]


def training_sample(model):
    """The 568-token two-image training layout (``training_layout``) and its pixels."""
    from paddlemix.models.internlm_xcomposer2.processor import InternLMXComposer2Processor

    processor = InternLMXComposer2Processor.from_config(tokenizer(), model.config)
    layout = processor.training_layout(TRAIN_CONVERSATION, 2)
    return layout, processor.pixel_values([IMG1, IMG2])


def set_trainable(model, trainable: str) -> int:
    """``full``: every LLM/projector weight (ViT frozen, as the official fine-tuning);
    ``plora``: only Plora_A/Plora_B. Returns the number of trainable parameters."""
    count = 0
    for name, param in model.named_parameters():
        if name.startswith("vit."):
            param.stop_gradient = True
        elif trainable == "full":
            param.stop_gradient = False
        else:
            param.stop_gradient = "Plora_" not in name
        if not param.stop_gradient:
            count += int(np.prod(param.shape))
    return count


def cmd_train(model, args, trainable: str, batch: int) -> Dict[str, Any]:
    name = f"train-step-{trainable}-b{batch}"
    layout, pixels = training_sample(model)
    log(f"{name}: {len(layout)} tokens ({sum(layout.im_mask)} image tokens), batch {batch}")
    n_trainable = set_trainable(model, trainable)
    model.train()
    ids = paddle.to_tensor([layout.ids] * batch, dtype="int64")
    im_mask = paddle.to_tensor([layout.im_mask] * batch, dtype="bool")
    labels = paddle.to_tensor([layout.labels] * batch, dtype="int64")
    pixel_values = paddle.to_tensor(np.concatenate([pixels] * batch))

    def step():
        t0 = time.perf_counter()
        loss = model(input_ids=ids, im_mask=im_mask, labels=labels, pixel_values=pixel_values).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        model.clear_gradients(set_to_zero=False)
        return {"step_s": t2 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1}

    try:
        with RSSPeak() as rss:
            runs = repeat(step, args.runs, 1, args.idle_wait)
    finally:
        model.eval()
        set_trainable(model, "full")
    step_s = [r["step_s"] for r in runs]
    tokens = batch * len(layout)
    official = OFFICIAL[f"train_{trainable}_s"] if batch == 1 else None
    target = TARGETS[f"train_{trainable}_s"] if batch == 1 else None
    figures = {
        "step_s": figure(step_s, "s", official, target, lower_is_better=True),
        "forward_s": figure([r["forward_s"] for r in runs], "s", lower_is_better=True),
        "backward_s": figure([r["backward_s"] for r in runs], "s", lower_is_better=True),
        "tokens_per_s": figure([tokens / s for s in step_s], "tok/s"),
    }
    result = {"figures": figures, "tokens_per_sample": len(layout), "image_tokens": sum(layout.im_mask),
              "batch": batch, "trainable": trainable, "trainable_params": n_trainable,
              "peak_rss_gb": rss.peak / 1e9, "official_rss_gb": OFFICIAL.get(f"train_{trainable}_rss_gb"),
              "others_cpu_percent": [r["others_cpu_percent"] for r in runs],
              "notes": "forward with labels + backward; model.train() (PLoRA dropout 0.05 active, as officially); "
                       "ViT frozen; no optimizer step; peak RSS is the process peak during the timed runs"}
    if batch != 1:
        ref = _read_result(f"train-step-{trainable}-b1")
        if ref is not None:
            ratio = figures["tokens_per_s"]["median"] / ref["figures"]["tokens_per_s"]["median"]
            result["tokens_per_s_vs_batch1"] = ratio
            result["meets_batch_target"] = ratio >= TARGETS["batch4_tokens_per_s_ratio"]
    return write_result(name, result, args)


def _read_result(name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- loading --------------------------------------------------------------------------------
def save_hf_safetensors(model, directory: str) -> int:
    """Write ``model`` as the official HF layout: official names, torch ``[out, in]`` Linear
    weights, ``{"format": "pt"}`` metadata, plus ``config.json``. Returns the file size."""
    from safetensors.numpy import save_file

    from paddlemix.models.internlm_xcomposer2.conversion import from_model_name, is_linear_weight

    tensors = {}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy()
        if is_linear_weight(name, array.ndim):
            array = np.ascontiguousarray(array.T)
        tensors[from_model_name(name, "hf")] = array
    path = os.path.join(directory, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    return os.path.getsize(path)


def vm_hwm() -> int:
    """This process's peak RSS (``VmHWM``). Unlike ``ru_maxrss``, it starts afresh at ``exec``:
    a child's ``ru_maxrss`` keeps the RSS its parent had when it forked."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def load_child(directory: str) -> None:
    """Runs in a fresh process: time ``from_pretrained`` and report peak RSS as JSON."""
    base_rss = psutil.Process().memory_info().rss
    base_hwm = vm_hwm()
    t0 = time.perf_counter()
    with RSSPeak() as rss:
        model = InternLMXComposer2ForCausalLM.from_pretrained(directory)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"load_s": elapsed, "peak_rss": max(vm_hwm(), rss.peak), "polled_peak_rss": rss.peak,
                      "baseline_rss": base_rss, "baseline_hwm": base_hwm,
                      "final_rss": psutil.Process().memory_info().rss, "param_bytes": param_bytes(model)}))


def paddle_import_rss() -> int:
    """RSS of a fresh Python that imported Paddle and nothing else: with the weights on top, the
    lowest peak any Paddle program that holds them can reach."""
    code = "import os, paddle, psutil; print(psutil.Process(os.getpid()).memory_info().rss)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def cmd_load(model, args) -> Dict[str, Any]:
    params = param_bytes(model)
    paddle_only = paddle_import_rss()
    with tempfile.TemporaryDirectory(prefix="ixc2-bench-load-") as directory:
        size = save_hf_safetensors(model, directory)
        log(f"load: saved {size / 1e9:.2f} GB HF-layout safetensors; from_pretrained in a child process per run")

        def one():
            wait_for_idle(args.idle_wait)
            with MachineLoad() as load:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "_load-child", directory,
                                      "--threads", str(THREADS)], check=True, capture_output=True, text=True)
            data = json.loads(out.stdout.strip().splitlines()[-1])
            data["others_cpu_percent"] = load.others_percent
            return data

        one()  # warm-up (page cache, bytecode)
        runs = []
        for i in range(args.runs):
            runs.append(one())
            log(f"  run {i + 1}/{args.runs}: load {runs[-1]['load_s']:.2f} s, peak RSS {runs[-1]['peak_rss'] / 1e9:.2f} GB")
    peak = [r["peak_rss"] / 1e9 for r in runs]
    over_base = [(r["peak_rss"] - r["baseline_rss"]) / 1e9 for r in runs]
    figures = {
        "load_s": figure([r["load_s"] for r in runs], "s", target=TARGETS["load_s"], lower_is_better=True),
        "peak_rss_gb": figure(peak, "GB", OFFICIAL["load_peak_rss_gb"], lower_is_better=True),
        "peak_rss_over_baseline_gb": figure(over_base, "GB", lower_is_better=True),
        "peak_rss_over_param_bytes": figure([p * 1e9 / params for p in peak], "x",
                                            target=TARGETS["load_peak_rss_over_param_bytes"], lower_is_better=True),
        "peak_rss_minus_baseline_over_param_bytes": figure([p * 1e9 / params for p in over_base], "x",
                                                           lower_is_better=True),
    }
    return write_result("load", {"figures": figures, "param_bytes": params, "file_bytes": size,
                                 "baseline_rss_gb": statistics.median(r["baseline_rss"] / 1e9 for r in runs),
                                 "paddle_import_rss_gb": paddle_only / 1e9,
                                 "floor_over_param_bytes": (paddle_only + params) / params,
                                 "others_cpu_percent": [r["others_cpu_percent"] for r in runs],
                                 "notes": "peak RSS (VmHWM) of a fresh child process (python + paddle + paddlenlp "
                                          "imports included = baseline) during from_pretrained of the HF-layout "
                                          "safetensors; floor = (RSS after importing Paddle alone + the "
                                          "parameter bytes) / parameter bytes: no Paddle process holding the "
                                          "weights can peak lower"},
                        args)


# --- overhead-bound decode ------------------------------------------------------------------
HOST_SYNC_METHODS = ("numpy", "item", "tolist", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Counts Tensor→host conversions (``numpy``, ``item``, ``bool(t)`` ...) while active."""

    def __enter__(self):
        self.count = 0
        self._depth = 0  # ``bool(t)`` calls ``t.numpy()`` inside: count the outermost call only
        self._saved = {}
        for meth in HOST_SYNC_METHODS:
            orig = getattr(paddle.Tensor, meth, None)
            if orig is None:
                continue
            self._saved[meth] = orig

            def wrapper(t, *a, _orig=orig, **k):
                self.count += self._depth == 0
                self._depth += 1
                try:
                    return _orig(t, *a, **k)
                finally:
                    self._depth -= 1

            setattr(paddle.Tensor, meth, wrapper)
        return self

    def __exit__(self, *exc):
        for meth, orig in self._saved.items():
            setattr(paddle.Tensor, meth, orig)
        return False


def count_decode_syncs(model, new_tokens: int) -> Dict[str, float]:
    """Host conversions per decode step inside ``generate_tokens`` (the consumer converts
    nothing): in all, and inside the model's forward (the decoder layers, the head)."""
    from paddlemix.models.internlm_xcomposer2.generation import GenerationSettings, generate_tokens, seen_ids

    tok = tokenizer()
    inputs, im_mask = model.interleav_wrap_chat(tok, IMAGE_QUERY, IMG1)
    settings = GenerationSettings(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.005,
                                  eos_token_ids=(), pad_token_id=tok.pad_token_id)
    gen = generate_tokens(model, inputs["inputs_embeds"], settings, seen_ids([[tok.bos_token_id]]),
                          im_mask=im_mask)
    next(gen)  # prefill (its syncs are not the decode loop's)
    in_forward = [0]
    cls = type(model)
    own_call = cls.__dict__.get("__call__")  # None: inherited from paddle.nn.Layer
    original_call = cls.__call__

    def counted_call(self, *args, **kwargs):
        before = counter.count
        try:
            return original_call(self, *args, **kwargs)
        finally:
            in_forward[0] += counter.count - before

    cls.__call__ = counted_call
    try:
        with SyncCounter() as counter:
            steps = sum(1 for _ in gen)
    finally:
        if own_call is None:
            del cls.__call__
        else:
            cls.__call__ = own_call
    steps = max(steps, 1)
    return {"per_step": counter.count / steps, "in_forward_per_step": in_forward[0] / steps}


def cmd_overhead(args) -> Dict[str, Any]:
    config = overhead_config()
    model = build_model(config)
    layers = config.num_hidden_layers
    log(f"overhead: {layers} layers, hidden {config.hidden_size}; image chat, greedy, {NEW_TOKENS} new tokens")
    runs = repeat(lambda: timed_chat(model, IMAGE_QUERY, IMG1, NEW_TOKENS), args.runs, 1, args.idle_wait)
    ms = [1e3 / r["decode_tps"] for r in runs]
    syncs = count_decode_syncs(model, 16)
    figures = {
        "ms_per_token": figure(ms, "ms", OFFICIAL["overhead_ms_per_token"], lower_is_better=True),
        "us_per_layer_token": figure([1e3 * v / layers for v in ms], "us", OFFICIAL["overhead_us_per_layer_token"],
                                     TARGETS["overhead_us_per_layer_token"], lower_is_better=True),
    }
    return write_result("overhead", {"figures": figures, "host_syncs_per_decode_step": syncs["per_step"],
                                     "host_syncs_per_decode_step_in_forward": syncs["in_forward_per_step"],
                                     "meets_sync_target": syncs["in_forward_per_step"]
                                     <= TARGETS["overhead_syncs_in_forward_per_token"],
                                     "others_cpu_percent": [r["others_cpu_percent"] for r in runs],
                                     "notes": "host syncs = Tensor.numpy/item/tolist/bool/int/float/index calls "
                                              "inside generate_tokens per decode step: 1 (the chosen ids; greedy "
                                              "on a CPU, the last logits), needed to stream and to stop, so a "
                                              "per-step 0 is not met; of those, inside the model's forward (the "
                                              "layers and the head): target 0, what meets_sync_target checks"},
                        args)


def cmd_bandwidth(args) -> Dict[str, Any]:
    global _BANDWIDTH
    wait_for_idle(args.idle_wait)
    with MachineLoad() as load:
        _BANDWIDTH = measure_copy_bandwidth(max(args.runs, 5))
    _BANDWIDTH["others_cpu_percent"] = load.others_percent
    config = bench_config()
    bound = decode_bound(config)
    figures = {"copy_gbps": figure(_BANDWIDTH["runs_gbps"], "GB/s", OFFICIAL["copy_bandwidth_gbps"]),
               "decode_bound_tps": figure([v * 1e9 / bound["weight_bytes_per_token"] for v in _BANDWIDTH["runs_gbps"]],
                                          "tok/s", OFFICIAL["copy_bandwidth_gbps"] * 1e9 / bound["weight_bytes_per_token"])}
    return write_result("bandwidth", {"figures": figures, "bound": bound,
                                      "notes": "numpy copy of 1 GiB, bytes read + written; bound = non-PLoRA weight "
                                               "bytes per decoded token / bandwidth"}, args)


# --- driver ---------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["decode-image", "decode-text", "prefill", "train-step", "load", "overhead",
                                            "bandwidth", "gemm", "all", "_load-child"])
    parser.add_argument("directory", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=7, help="timed runs (>= 5 recommended; default 7)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (set before Paddle is imported)")
    parser.add_argument("--trainable", choices=["full", "plora"], default="full")
    parser.add_argument("--batch", type=int, choices=[1, 4], default=1)
    parser.add_argument("--mkl-default", action="store_true",
                        help="measure without the CPU-vendor settings of paddlemix/cpu_env.py (read before Paddle loads)")
    parser.add_argument("--plain-kernels", action="store_true",
                        help="force the plain (non-fused) CPU kernels an AVX2-only CPU takes")
    parser.add_argument("--idle-wait", type=float, default=2.0,
                        help="before each run, wait up to this many seconds for the machine to be idle (default 2)")
    args = parser.parse_args(argv)
    global IDLE_WAIT
    IDLE_WAIT = args.idle_wait

    if args.command == "_load-child":
        load_child(args.directory)
        return
    if args.command == "all":
        run_all(args)
        return
    bandwidth()
    if args.command == "bandwidth":
        cmd_bandwidth(args)
        return
    if args.command == "gemm":
        cmd_gemm(args)
        return
    if args.command == "overhead":
        cmd_overhead(args)
        return
    model = build_model(bench_config())
    if args.command == "decode-image":
        cmd_decode(model, args, image=True)
    elif args.command == "decode-text":
        cmd_decode(model, args, image=False)
    elif args.command == "prefill":
        cmd_prefill(model, args)
    elif args.command == "train-step":
        cmd_train(model, args, args.trainable, args.batch)
    elif args.command == "load":
        cmd_load(model, args)


def run_all(args) -> None:
    """Every figure in a fresh process of its own, one after another, as a user runs one job
    per process: a process that has just run a 6 GB training step decodes the overhead model
    ~25 % slower (measured: heap state), so one shared process would skew the later figures."""
    t0 = time.perf_counter()
    common = (["--threads", str(THREADS), "--idle-wait", str(args.idle_wait)] + (["--mkl-default"] if MKL_DEFAULT else [])
              + (["--plain-kernels"] if PLAIN_KERNELS else []))
    runs = ["--runs", str(args.runs)]
    jobs = [
        ("bandwidth", ["bandwidth", *runs]),
        ("gemm", ["gemm"]),
        ("prefill", ["prefill", *runs]),
        ("decode-image", ["decode-image", *runs]),
        ("decode-text", ["decode-text", *runs]),
        ("load", ["load", *runs]),
        ("train-step-full-b1", ["train-step", "--trainable", "full", "--batch", "1", *runs]),
        ("train-step-plora-b1", ["train-step", "--trainable", "plora", "--batch", "1", *runs]),
        ("train-step-plora-b4", ["train-step", "--trainable", "plora", "--batch", "4", "--runs",
                                 str(max(5, min(args.runs, 5)))]),
        ("overhead", ["overhead", *runs]),
    ]
    results = {}
    for name, argv in jobs:
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, *common], check=True)
        results[name] = _read_result(name)
    summary = {name: {k: {"median": f["median"], "unit": f["unit"], "official": f.get("official"),
                          "vs_official": f.get("vs_official"), "target": f.get("target"),
                          "meets_target": f.get("meets_target")}
                      for k, f in r["figures"].items()} for name, r in results.items()}
    summary["_elapsed_s"] = time.perf_counter() - t0
    with open(os.path.join(RESULTS, "all.json"), "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "threads": THREADS, "versions": versions(), "machine": machine_info(),
                   "copy_bandwidth": results["bandwidth"]["copy_bandwidth"],
                   "notes": "each figure measured in a fresh child process"}, f, indent=2)
    log(f"all: {summary['_elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
