"""GPU memory estimates for InternLM-XComposer2-7B (chat, LoRA and full fine-tuning), computed
from the real parameter list (``../shared/fixtures/ixc2-7b-state-dict.json``, or the model
built lazily from the default config) and per-token activation sizes of this implementation.

These are ESTIMATES (no GPU here): they count tensors, not allocator overhead or kernel
workspaces (add ~10 %). Usage: ``python benchmarks/memory_estimate.py [--max_length 4096]``;
writes ``benchmarks/results/memory_estimate.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

GB = 1e9  # decimal gigabytes, as GPU memory is quoted
BF16, FP32 = 2, 4
LORA_TARGETS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def parameter_groups() -> Dict[str, int]:
    """Parameter counts by role, from the model built without allocating (7B defaults)."""
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Config, InternLMXComposer2ForCausalLM
    from paddlemix.models.internlm_xcomposer2.checkpoint import build_model

    model = build_model(InternLMXComposer2ForCausalLM, InternLMXComposer2Config(), "bfloat16", lazy=True)
    groups = {"vit": 0, "plora": 0, "llm": 0, "projector": 0}
    for name, param in model.state_dict().items():
        count = 1
        for size in param.shape:
            count *= size
        key = "vit" if name.startswith("vit.") else "projector" if name.startswith("vision_proj") else \
            "plora" if ".Plora_" in name else "llm"
        groups[key] += count
    cfg = model.config
    hidden, inter, qkv = cfg.hidden_size, cfg.intermediate_size, (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    per_layer = {"attention.wqkv": (hidden, qkv), "attention.wo": (hidden, hidden), "feed_forward.w1": (hidden, inter),
                 "feed_forward.w3": (hidden, inter), "feed_forward.w2": (inter, hidden)}
    groups["lora_r64"] = cfg.num_hidden_layers * sum(64 * (i + o) for i, o in per_layer.values())
    return groups, cfg


def activations_per_layer(tokens: int, cfg, recompute_attention_scores: bool = True) -> float:
    """Bytes kept for backward by one decoder layer (bf16 activations, fp32 attention scores
    and probabilities as this implementation computes them)."""
    h, inter, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    qkv = (heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    linear_inputs = tokens * (h + h + h + inter) * BF16  # wqkv, wo, w1/w3, w2 inputs
    other = tokens * (qkv + 2 * inter + 4 * h) * BF16  # qkv out, gate/up outs, norms, residuals
    scores = 2 * heads * tokens * tokens * FP32 if recompute_attention_scores else 0  # scores + probs
    return linear_inputs + other + scores


def estimate(max_length: int) -> Dict[str, Dict[str, float]]:
    groups, cfg = parameter_groups()
    total = sum(v for k, v in groups.items() if k != "lora_r64")
    trainable_full = total - groups["vit"]
    weights = total * BF16
    layers = cfg.num_hidden_layers
    kv_cache = 2 * layers * cfg.num_key_value_heads * cfg.head_dim * max_length * BF16
    act_full = layers * activations_per_layer(max_length, cfg)
    act_recompute = layers * max_length * cfg.hidden_size * BF16 + activations_per_layer(max_length, cfg)
    labelled = max_length // 2  # logits only on labelled rows (answers): assume half the sample
    logits = 2 * labelled * cfg.vocab_size * FP32  # logits + their gradient
    adam_full = trainable_full * (FP32 + 2 * FP32)  # fp32 master weights + two moments (bf16 O2)
    grads_full = trainable_full * BF16
    lora = groups["lora_r64"]
    adam_lora = lora * 3 * FP32
    rows = {
        "chat (bf16, one image, 4096-token context)": {"weights": weights, "kv_cache": kv_cache,
                                                       "activations": 0.3 * GB},
        "LoRA r=64 SFT, recompute": {"weights": weights, "lora+adam": lora * BF16 + adam_lora + lora * BF16,
                                     "activations": act_recompute, "logits": logits},
        "LoRA r=64 SFT, no recompute": {"weights": weights, "lora+adam": lora * BF16 + adam_lora + lora * BF16,
                                        "activations": act_full, "logits": logits},
        "full SFT, recompute (1 GPU, no sharding)": {"weights": weights, "grads": grads_full, "adam": adam_full,
                                                     "activations": act_recompute, "logits": logits},
        "full SFT, recompute, sharding stage2 on 8 GPUs": {"weights": weights, "grads": grads_full / 8,
                                                           "adam": adam_full / 8, "activations": act_recompute,
                                                           "logits": logits},
        "full SFT, no recompute (1 GPU)": {"weights": weights, "grads": grads_full, "adam": adam_full,
                                           "activations": act_full, "logits": logits},
    }
    out = {name: {k: round(v / GB, 1) for k, v in parts.items()} for name, parts in rows.items()}
    for name, parts in out.items():
        parts["total_GB"] = round(sum(parts.values()), 1)
    out["_parameters"] = {k: v for k, v in groups.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_length", type=int, default=4096)
    args = parser.parse_args()
    result = estimate(args.max_length)
    print(f"{'setting':52s} {'GB':>7s}  breakdown (GB)")
    for name, parts in result.items():
        if not name.startswith("_"):
            detail = ", ".join(f"{k} {v}" for k, v in parts.items() if k != "total_GB")
            print(f"{name:52s} {parts['total_GB']:7.1f}  {detail}")
    out = Path(__file__).parent / "results" / "memory_estimate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"max_length": args.max_length, "estimates_GB": result}, indent=2))


if __name__ == "__main__":
    main()
