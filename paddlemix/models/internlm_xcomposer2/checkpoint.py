"""Load and save InternLM-XComposer2 weights: strict, streaming, any of the three layouts.

Loading builds the model without allocating or initialising its parameters
(``paddle.LazyGuard`` + ``no_init_weights``), checks every tensor's name and shape from
the file headers before reading any data, then reads, converts and assigns one tensor
at a time. Peak memory is the model plus about one tensor.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
import paddle
from paddlenlp.transformers.model_utils import dtype_guard, no_init_weights

from .configuration import InternLMXComposer2Config
from .conversion import OPTIONAL_KEYS, VIT, convert_shapes, convert_tensor, from_model_name
from .readers import CheckpointError, CheckpointFile, open_checkpoint_file
from .vision import resize_position_table

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CONFIG_NAME",
    "SAFE_WEIGHTS_NAME",
    "find_weight_files",
    "detect_layout",
    "load_config",
    "build_model",
    "load_weights",
    "save_weights",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
_INDEX_SUFFIX = ".index.json"
# Looked for in this order; an index (sharded checkpoint) wins over a single file.
WEIGHT_FILE_NAMES = (SAFE_WEIGHTS_NAME, "model_state.pdparams", "pytorch_model.bin")
# safetensors metadata written by save_weights; HF writes {"format": "pt"}.
PADDLE_FORMAT = {"format": "paddle", "layout": "internlm_xcomposer2"}
DTYPES = ("float32", "bfloat16", "float16")
POSITION_TABLE = VIT + "embeddings.position_embedding.weight"
DEFAULT_SHARD_BYTES = 5 * 1024**3


def find_weight_files(directory: str) -> List[str]:
    """The weight files of a checkpoint directory (all shards if it has an index)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    for name in WEIGHT_FILE_NAMES:
        index = os.path.join(directory, name + _INDEX_SUFFIX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid shard index ({err})") from None
            return [os.path.join(directory, s) for s in shards]
        if os.path.isfile(os.path.join(directory, name)):
            return [os.path.join(directory, name)]
    raise FileNotFoundError(
        f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILE_NAMES)} (or a sharded *.index.json)"
    )


def detect_layout(files: Sequence[CheckpointFile]) -> str:
    """``"hf"`` (torch layout), ``"paddlemix"`` or ``"paddle"`` (ours), from the file itself."""
    first = files[0]
    if first.path.endswith(".bin"):
        return "hf"
    if first.path.endswith(".safetensors"):
        return "paddle" if first.metadata().get("format") == PADDLE_FORMAT["format"] else "hf"
    names = [n for f in files for n in f.infos()]
    return "paddlemix" if any(n.startswith(VIT + "transformer.") or n.startswith(VIT + "conv1") for n in names) else "paddle"


def load_config(directory: str, **overrides) -> InternLMXComposer2Config:
    """Read ``config.json`` (official, PaddleMIX or ours). For PaddleMIX checkpoints whose
    ``vision_tower`` names a sub-directory with a CLIP config, the ViT sizes come from it
    (otherwise the CLIP ViT-L/14-336 defaults) — never from a download."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None
    model_type = values.get("model_type", InternLMXComposer2Config.model_type)
    if model_type not in (InternLMXComposer2Config.model_type, "internlm"):
        raise ValueError(f"{path}: model_type {model_type!r} is not an InternLM-XComposer2 config")
    tower = values.get("vision_tower")
    if "vision_config" not in values and isinstance(tower, str):
        tower_config = os.path.join(directory, tower, CONFIG_NAME)
        if os.path.isfile(tower_config):
            with open(tower_config, encoding="utf-8") as f:
                values["vision_config"] = json.load(f)
    values.pop("model_type", None)
    values.update(overrides)
    return InternLMXComposer2Config(**values)


def build_model(model_class, config: InternLMXComposer2Config, dtype: str, lazy: bool):
    """Construct the model in ``dtype``; with ``lazy`` no parameter memory is allocated or
    initialised (every parameter must then be assigned or ``initialize()``d)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    with dtype_guard(dtype):
        if not lazy:
            return model_class(config)
        with no_init_weights(), paddle.LazyGuard():
            return model_class(config)


def _to_paddle(array: np.ndarray, dtype: str) -> paddle.Tensor:
    """Cast in numpy (ml_dtypes gives bf16) and hand the bits to Paddle."""
    if dtype == "bfloat16":
        if array.dtype != ml_dtypes.bfloat16:
            array = array.astype(np.float32).astype(ml_dtypes.bfloat16)
        return paddle.to_tensor(array.view(np.uint16)).view(paddle.bfloat16)
    return paddle.to_tensor(array.astype(dtype, copy=False))


def _plan(model, files: Sequence[CheckpointFile], layout: str):
    """Check names and shapes from the headers only; raise one error listing every problem."""
    expected = {name: list(p.shape) for name, p in model.state_dict().items()}
    plan: List[Tuple[CheckpointFile, str, str]] = []
    seen, unexpected, wrong = set(), [], []
    for f in files:
        shapes = {n: i.shape for n, i in f.infos().items()}
        for (src, _), (name, shape) in zip(shapes.items(), convert_shapes(shapes, layout).items()):
            if name not in expected:
                unexpected.append(f"{src} (in {os.path.basename(f.path)})")
                continue
            resizable = name == POSITION_TABLE and shape[1:] == expected[name][1:]
            if shape != expected[name] and not resizable:
                wrong.append(f"{src} in {os.path.basename(f.path)}: checkpoint {shape}, model {expected[name]}")
            seen.add(name)
            plan.append((f, src, name))
    missing = [from_model_name(n, layout) for n in expected if n not in seen and n not in OPTIONAL_KEYS]
    if missing or unexpected or wrong:
        where = os.path.dirname(files[0].path) or "."
        parts = []
        for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)):
            if items:
                parts.append(f"{len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError(f"checkpoint in {where} ({layout} layout) does not fit the model: " + "; ".join(parts))
    return plan, [n for n in expected if n not in seen]


def load_weights(model, files: Sequence[CheckpointFile], layout: str, dtype: str) -> None:
    """Assign every tensor of ``files`` to ``model`` (strict), converting layout and dtype."""
    plan, absent = _plan(model, files, layout)
    params = model.state_dict()
    for f, src, name in plan:
        model_name, array = convert_tensor(src, f.read(src), layout)
        param = params[model_name]
        if list(array.shape) != list(param.shape):  # the CLIP position table at another image size
            grid = model.config.image_grid
            table = resize_position_table(paddle.to_tensor(array.astype(np.float32)), grid)
            array = table.numpy()
            logger.info("resized %s from %d to %d rows (img_size %d)", src, f.infos()[src].shape[0], array.shape[0], model.config.img_size)
        param.set_value(_to_paddle(array, dtype))
        del array
    for name in absent:  # optional, unused tensors (post_layernorm) absent from the file
        if not params[name]._is_initialized():
            params[name].initialize()
        logger.info("%s not in the checkpoint (unused by the model); left at its default", name)


def save_weights(model, directory: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> List[str]:
    """Write the state dict as safetensors in Paddle layout, sharded above ``max_shard_bytes``.

    One shard is materialised at a time (memory: model + one shard), and each file is
    written under a temporary name and renamed, so a crash never leaves a partial file
    under a final name.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    state = model.state_dict()
    groups: List[List[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = int(np.prod(tensor.shape, dtype=np.int64)) * paddle.core.size_of_dtype(tensor.dtype)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = [SAFE_WEIGHTS_NAME] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
    ]
    for group, fname in zip(groups, files):
        tmp = os.path.join(directory, fname + ".tmp")
        save_file({name: _to_numpy(state[name]) for name in group}, tmp, metadata=PADDLE_FORMAT)
        os.replace(tmp, os.path.join(directory, fname))
    if len(groups) > 1:
        weight_map = {name: fname for group, fname in zip(groups, files) for name in group}
        _write_json_atomic(os.path.join(directory, SAFE_WEIGHTS_NAME + _INDEX_SUFFIX), {"weight_map": weight_map})
    return files


def _to_numpy(tensor: paddle.Tensor) -> np.ndarray:
    if tensor.dtype == paddle.bfloat16:
        return tensor.view(paddle.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _write_json_atomic(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def open_weight_files(directory: str) -> List[CheckpointFile]:
    return [open_checkpoint_file(p) for p in find_weight_files(directory)]
