"""Convert a checkpoint directory (any layout) into this project's format without building the
model's memory: a lazy model gives the names and shapes; tensors stream through one shard at a
time (``tools/convert_checkpoint.py``)."""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import ml_dtypes
import numpy as np
import paddle

from .checkpoint import (MAX_COPY_THREADS, PADDLE_SAFETENSORS_METADATA, POSITION_TABLE, _as_dtype, _fill, _plan,
                         build_model, detect_layout, load_config, open_weight_files)
from .conversion import is_linear_weight
from .files import INDEX_SUFFIX, SAFE_WEIGHTS_NAME, TOKENIZER_FILES
from .modeling import InternLMXComposer2ForCausalLM
from .readers import CheckpointFile, open_checkpoint_file
from .vision import resize_position_table

__all__ = ["convert_checkpoint", "DEFAULT_SHARD_BYTES"]

DEFAULT_SHARD_BYTES = 2 * 1024**3  # conversion memory is about one shard


def convert_checkpoint(src: str, dst: str, dtype: Optional[str] = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> List[str]:
    """Convert a checkpoint directory (any layout) into this project's format — our names,
    Paddle layout, ``model*.safetensors`` (+ index) and ``config.json`` — without building
    the model: tensors stream through one shard at a time, so converting the single 17 GB
    ``pytorch_model.bin`` of the 7B needs about one shard of memory, not the model.
    ``dtype`` casts (default: keep each tensor's dtype). Returns the written weight files."""
    from safetensors.numpy import save_file

    config = load_config(src)
    files = open_weight_files(src)
    layout = detect_layout(files)
    plan, _ = _plan(build_model(InternLMXComposer2ForCausalLM, config, dtype or "float32", lazy=True), files, layout)
    os.makedirs(dst, exist_ok=True)
    shards: List[Dict[str, np.ndarray]] = [{}]
    sizes = [0]
    written: List[str] = []

    def flush() -> None:
        name = f"model-{len(written) + 1:05d}.safetensors"
        save_file(shards[-1], os.path.join(dst, name + ".tmp"), metadata=PADDLE_SAFETENSORS_METADATA)
        os.replace(os.path.join(dst, name + ".tmp"), os.path.join(dst, name))
        written.append(name)
        shards[-1], sizes[-1] = {}, 0

    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, MAX_COPY_THREADS))) as pool:
        for f, src_name, name in plan:
            array = _converted(f, src_name, name, layout, dtype, config, pool)
            if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
                flush()
            shards[-1][name] = array
            sizes[-1] += array.nbytes
            del array
        if shards[-1]:
            flush()
    return _finish_conversion(src, dst, config, written)


def _converted(f: CheckpointFile, src_name: str, name: str, layout: str, dtype: Optional[str], config,
               pool: ThreadPoolExecutor) -> np.ndarray:
    """One tensor in Paddle layout (and ``dtype``), built block by block."""
    info = f.infos()[src_name]
    target = dtype or ("bfloat16" if info.dtype in (np.uint16, ml_dtypes.bfloat16) else str(info.dtype))
    transpose = layout == "hf" and is_linear_weight(name, len(info.shape))
    if name == POSITION_TABLE and info.shape[0] != config.image_grid**2 + 1:
        table = resize_position_table(paddle.to_tensor(_as_dtype(f.read(src_name), "float32")), config.image_grid)
        return _as_dtype(table.numpy(), target)
    shape = tuple(info.shape[::-1]) if transpose else tuple(info.shape)
    out = np.empty(shape, dtype=ml_dtypes.bfloat16 if target == "bfloat16" else np.dtype(target))
    if transpose or not f.read_into(src_name, out):
        _fill(out, f.row_blocks(src_name), transpose, pool)
    return out


def _finish_conversion(src: str, dst: str, config, written: List[str]) -> List[str]:
    """Name the shards, write their index, the config and the tokenizer files."""
    final = [SAFE_WEIGHTS_NAME] if len(written) == 1 else [
        f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for old, new in zip(written, final):
        os.replace(os.path.join(dst, old), os.path.join(dst, new))
        weight_map.update({name: new for name in open_checkpoint_file(os.path.join(dst, new)).infos()})
    if len(final) > 1:
        index = os.path.join(dst, SAFE_WEIGHTS_NAME + INDEX_SUFFIX)
        with open(index + ".tmp", "w", encoding="utf-8") as f:
            json.dump({"metadata": {"format": "paddle"}, "weight_map": weight_map}, f, indent=1)
        os.replace(index + ".tmp", index)
    config.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return final
