"""The one place that knows how checkpoint layouts map onto this model's parameters.

Three layouts exist:

* ``"hf"`` — the official Hugging Face release: our names, torch layout (every
  ``nn.Linear`` weight is ``[out, in]``).
* ``"paddlemix"`` — checkpoints written by PaddleMIX's port: LLM names as ours, the
  ViT under PaddleNLP-CLIP names (``conv1``, ``ln_pre``, ``transformer.layers.{j}.norm1``,
  ``linear1``, ...), Paddle layout (``[in, out]``), no ``post_layernorm``.
* ``"paddle"`` — this project's own ``save_pretrained``: our names, Paddle layout.

Rule for the layout: a 2-D ``*.weight`` is a Linear weight (transposed between torch and
Paddle) unless it is an embedding table; conv kernels are 4-D and never transposed.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

import numpy as np

__all__ = [
    "LAYOUTS",
    "EMBEDDING_TABLES",
    "OPTIONAL_KEYS",
    "is_linear_weight",
    "to_model_name",
    "from_model_name",
    "convert_tensor",
    "convert_shapes",
]

LAYOUTS = ("hf", "paddlemix", "paddle")
VIT = "vit.vision_tower.vision_model."
EMBEDDING_TABLES = ("model.tok_embeddings.weight", VIT + "embeddings.position_embedding.weight")
# Present in the official module tree but unused by the forward; PaddleMIX drops them.
OPTIONAL_KEYS = (VIT + "post_layernorm.weight", VIT + "post_layernorm.bias")

# PaddleMIX (PaddleNLP CLIP) ViT names → official (HF CLIP) names, after the ``VIT`` prefix.
_PADDLEMIX_VIT_RULES: List[Tuple[str, str]] = [
    (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^conv1\.weight$", "embeddings.patch_embedding.weight"),
    (r"^positional_embedding\.weight$", "embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "pre_layrnorm."),
    (r"^ln_post\.", "post_layernorm."),
    (r"^transformer\.layers\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^transformer\.layers\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^transformer\.layers\.(\d+)\.linear1\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.layers\.(\d+)\.linear2\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^transformer\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
]
_OFFICIAL_VIT_RULES: List[Tuple[str, str]] = [
    (r"^embeddings\.class_embedding$", "class_embedding"),
    (r"^embeddings\.patch_embedding\.weight$", "conv1.weight"),
    (r"^embeddings\.position_embedding\.weight$", "positional_embedding.weight"),
    (r"^pre_layrnorm\.", "ln_pre."),
    (r"^post_layernorm\.", "ln_post."),
    (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"transformer.layers.\1.norm1."),
    (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"transformer.layers.\1.norm2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.layers.\1.linear1."),
    (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.layers.\1.linear2."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.", r"transformer.layers.\1.self_attn."),
]


def _rename_vit(name: str, rules: List[Tuple[str, str]]) -> str:
    if not name.startswith(VIT):
        return name
    tail = name[len(VIT) :]
    for pattern, repl in rules:
        new_tail, count = re.subn(pattern, repl, tail)
        if count:
            return VIT + new_tail
    return name


def to_model_name(name: str, layout: str) -> str:
    """Checkpoint tensor name in ``layout`` → this model's parameter name."""
    _check_layout(layout)
    return _rename_vit(name, _PADDLEMIX_VIT_RULES) if layout == "paddlemix" else name


def from_model_name(name: str, layout: str) -> str:
    """This model's parameter name → the name ``layout`` uses."""
    _check_layout(layout)
    return _rename_vit(name, _OFFICIAL_VIT_RULES) if layout == "paddlemix" else name


def is_linear_weight(model_name: str, ndim: int) -> bool:
    return ndim == 2 and model_name.endswith(".weight") and model_name not in EMBEDDING_TABLES


def _needs_transpose(model_name: str, ndim: int, layout: str) -> bool:
    return layout == "hf" and is_linear_weight(model_name, ndim)


def convert_tensor(name: str, array: np.ndarray, layout: str) -> Tuple[str, np.ndarray]:
    """One checkpoint tensor → ``(model name, array in Paddle layout)``."""
    model_name = to_model_name(name, layout)
    if _needs_transpose(model_name, array.ndim, layout):
        array = np.ascontiguousarray(array.T)
    return model_name, array


def convert_shapes(shapes: Dict[str, Iterable[int]], layout: str) -> Dict[str, List[int]]:
    """Name → shape map of a checkpoint → the names/shapes it gives in Paddle layout.
    Used to check a full-size (7B) layout without allocating any tensor."""
    out: Dict[str, List[int]] = {}
    for name, shape in shapes.items():
        shape = list(shape)
        model_name = to_model_name(name, layout)
        out[model_name] = shape[::-1] if _needs_transpose(model_name, len(shape), layout) else shape
    return out


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
