"""Peak memory of loading / converting a large bf16 torch ``pytorch_model.bin`` (the 7B ships one
17.3 GB file), measured on a synthetic checkpoint of >= 2 GB with the 7B's key layout and
scaled-down shapes (32 layers, hidden 1536, intermediate 5376, vocab 92544).

Without torch: the file is written in torch's zip format (``archive/data.pkl`` + one
uncompressed storage per tensor) by a small writer below, tensor by tensor.

Each measurement runs in a fresh child process and reports its peak RSS (``VmHWM``) above the
interpreter's own baseline (Python + Paddle + PaddleNLP imports):

* ``convert``: ``convert_checkpoint`` → sharded safetensors (shards of ``--shard_mb``);
  target: peak <= 1.3 x the largest tensor + one shard (the output being built).
* ``load``: ``from_pretrained(dtype="bfloat16")``; target: peak ~ the model itself (never the
  file twice).

Usage: ``python benchmarks/convert_memory.py [--keep DIR]``; writes
``benchmarks/results/convert_memory.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import pickle
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

SHAPES = dict(hidden_size=1536, intermediate_size=5376, num_hidden_layers=32, num_attention_heads=12,
              num_key_value_heads=4, lora_r=64, lora_alpha=64,
              vision_config={"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                             "intermediate_size": 1024, "patch_size": 14, "image_size": 336})


def _rebuild_tensor_v2(*args):  # only its name is pickled
    raise NotImplementedError


class BFloat16Storage:  # only its name is pickled
    pass


class _StorageRef:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _TensorRef:
    def __init__(self, storage: _StorageRef, shape) -> None:
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        strides, step = [], 1
        for size in reversed(self.shape):
            strides.append(step)
            step *= size
        return _rebuild_tensor_v2, (self.storage, 0, self.shape, tuple(reversed(strides)), False,
                                    collections.OrderedDict())


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", BFloat16Storage, obj.key, "cpu", obj.numel)
        return None


def write_torch_bin(path: Path, shapes: dict, seed: int = 0) -> int:
    """Write ``{name: shape}`` as random bf16 tensors in torch's zip format; returns bytes."""
    rng = np.random.default_rng(seed)
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    fake_torch.BFloat16Storage, fake_utils._rebuild_tensor_v2 = BFloat16Storage, _rebuild_tensor_v2
    BFloat16Storage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    prefix = path.stem
    state = collections.OrderedDict()
    total = 0
    try:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, (name, shape) in enumerate(shapes.items()):
                numel = int(np.prod(shape))
                data = (rng.standard_normal(numel, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                with zf.open(f"{prefix}/data/{key}", "w", force_zip64=True) as f:
                    f.write(data.view(np.uint16).tobytes())
                total += data.nbytes
                del data
                state[name] = _TensorRef(_StorageRef(str(key), numel), shape)
            body = __import__("io").BytesIO()
            _TorchPickler(body, protocol=2).dump(state)
            zf.writestr(f"{prefix}/data.pkl", body.getvalue())
            zf.writestr(f"{prefix}/version", "3\n")
            zf.writestr(f"{prefix}/byteorder", "little")
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
    return total


def official_shapes() -> dict:
    """The 7B key layout at SHAPES sizes: official names, torch [out, in] Linear weights."""
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
    from paddlemix.models.internlm_xcomposer2.checkpoint import build_model
    from paddlemix.models.internlm_xcomposer2.conversion import is_linear_weight

    model = build_model(InternLMXComposer2ForCausalLM, InternLMXComposer2Config(**SHAPES), "bfloat16", lazy=True)
    return {n: (list(p.shape)[::-1] if is_linear_weight(n, len(p.shape)) else list(p.shape))
            for n, p in model.state_dict().items()}, model.config


def _hwm() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(kind: str, src: str, dst: str, shard_mb: int) -> None:
    import paddle  # noqa: F401  (the baseline includes the framework)
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM
    from paddlemix.models.internlm_xcomposer2.convert import convert_checkpoint

    base = _hwm()
    start = time.perf_counter()
    if kind == "convert":
        convert_checkpoint(src, dst, max_shard_bytes=shard_mb * 1024**2)
    else:
        InternLMXComposer2ForCausalLM.from_pretrained(src, dtype="bfloat16")
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_over_baseline": _hwm() - base,
                      "baseline": base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard_mb", type=int, default=512)
    parser.add_argument("--keep", help="keep the synthetic checkpoint in this directory")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], args.shard_mb)
        return
    work = Path(args.keep or tempfile.mkdtemp(prefix="ixc2-convert-mem-"))
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    shapes, config = official_shapes()
    if not (src / "pytorch_model.bin").is_file():
        config.save_pretrained(str(src))
        write_torch_bin(src / "pytorch_model.bin", shapes)
    largest = max(int(np.prod(s)) for s in shapes.values()) * 2
    total = sum(int(np.prod(s)) for s in shapes.values()) * 2
    results = {"file_bytes": (src / "pytorch_model.bin").stat().st_size, "model_bytes": total,
               "largest_tensor_bytes": largest, "shard_bytes": args.shard_mb * 1024**2}
    for kind in ("convert", "load"):
        out = subprocess.run([sys.executable, __file__, "--shard_mb", str(args.shard_mb), "--child", kind, str(src),
                              str(work / f"out-{kind}")], check=True, capture_output=True, text=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    convert_bound = 1.3 * largest + results["shard_bytes"]
    results["convert_bound_bytes"] = convert_bound
    results["convert_meets_bound"] = results["convert"]["peak_over_baseline"] <= convert_bound
    results["load_peak_over_model"] = results["load"]["peak_over_baseline"] / total
    gb = 1e9
    print(f"synthetic bf16 torch checkpoint: {results['file_bytes'] / gb:.2f} GB, largest tensor "
          f"{largest / gb:.3f} GB")
    print(f"convert: {results['convert']['seconds']:.1f} s, peak over baseline "
          f"{results['convert']['peak_over_baseline'] / gb:.3f} GB (bound 1.3 x largest + shard = "
          f"{convert_bound / gb:.3f} GB) -> {'OK' if results['convert_meets_bound'] else 'OVER'}")
    print(f"load (bf16): {results['load']['seconds']:.1f} s, peak over baseline "
          f"{results['load']['peak_over_baseline'] / gb:.3f} GB = {results['load_peak_over_model']:.2f} x the model")
    out_file = Path(__file__).parent / "results" / "convert_memory.json"
    out_file.parent.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
