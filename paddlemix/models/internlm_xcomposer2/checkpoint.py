"""Load and save InternLM-XComposer2 weights: strict, streaming, any of the three layouts.

Loading builds the model without allocating or initialising its parameters
(``paddle.LazyGuard`` + ``no_init_weights``), checks every tensor's name and shape from
the file headers before reading any data, then reads, converts and assigns one tensor
at a time. Peak memory is the model plus about one tensor.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Sequence, Tuple

import ml_dtypes
import numpy as np
import paddle
from paddlenlp.transformers.model_utils import dtype_guard, no_init_weights

from . import onednn
from .configuration import InternLMXComposer2Config
from .files import CONFIG_NAME, INDEX_SUFFIX, SAFE_WEIGHTS_NAME, WEIGHT_FILE_NAMES
from .conversion import OPTIONAL_KEYS, VIT, convert_shapes, from_model_name, is_linear_weight
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
    "save_atomically",
    "open_weight_files",
]

# safetensors "format" metadata of Paddle-layout files (PaddleNLP writes "np"); HF writes "pt".
PADDLE_FORMATS = ("np", "pd", "paddle")
PADDLE_SAFETENSORS_METADATA = {"format": "np"}  # what PaddleNLP's save_pretrained writes
DTYPES = ("float32", "bfloat16", "float16")
POSITION_TABLE = VIT + "embeddings.position_embedding.weight"
TRANSPOSE_TILE = 256  # 256x256 fp32 = 256 KB: a tile and its transpose stay in L2
TILES_PER_BAND = 8  # unit of work handed to a copy thread
MAX_COPY_THREADS = 8  # transposes are memory-bound: more threads than this buy nothing


def find_weight_files(directory: str) -> List[str]:
    """The weight files of a checkpoint directory (all shards if it has an index)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    for name in WEIGHT_FILE_NAMES:
        index = os.path.join(directory, name + INDEX_SUFFIX)
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
        return "paddle" if first.metadata().get("format") in PADDLE_FORMATS else "hf"
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
    array = _as_dtype(array, dtype)
    if dtype == "bfloat16":
        return paddle.to_tensor(array.view(np.uint16)).view(paddle.bfloat16)
    return paddle.to_tensor(array)


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` in ``dtype`` (numpy/ml_dtypes). PaddleNLP stores bf16 in safetensors as raw
    uint16 (``U16``); no tensor of this model is an integer, so uint16 always means bf16."""
    if array.dtype == np.uint16:
        array = array.view(ml_dtypes.bfloat16)
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return array if array.dtype == target else array.astype(target)


def _empty_buffer(param: paddle.Tensor) -> Tuple[paddle.Tensor, np.ndarray]:
    """An uninitialised Paddle tensor shaped like ``param`` and a writable numpy view of its
    memory, so a checkpoint tensor can be converted straight into its final storage."""
    tensor = paddle.empty(param.shape, dtype=param.dtype)
    nbytes = int(np.prod(param.shape, dtype=np.int64)) * paddle.core.size_of_dtype(param.dtype)
    raw = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(tensor.data_ptr()), dtype=np.uint8)
    view_dtype = ml_dtypes.bfloat16 if param.dtype == paddle.bfloat16 else np.dtype(str(param.dtype).split(".")[-1])
    return tensor, raw.view(view_dtype).reshape(param.shape)


def _adopt(param: paddle.Tensor, tensor: paddle.Tensor) -> None:
    """Make ``tensor``'s memory the (lazy, unallocated) parameter's storage: no copy."""
    param.get_tensor()._share_data_with(tensor.value().get_tensor())


def _fill(view: np.ndarray, blocks, transpose: bool, pool: ThreadPoolExecutor) -> None:
    """Write row blocks of a checkpoint tensor into ``view`` (converting dtype, transposing a
    torch ``[out, in]`` Linear weight into Paddle's ``[in, out]``), one block at a time."""
    for first, block in blocks:
        block = _as_dtype(block, "bfloat16" if view.dtype == ml_dtypes.bfloat16 else str(view.dtype))
        if transpose:
            _transpose_into(view[:, first : first + block.shape[0]], block, pool)
        else:
            view[first : first + block.shape[0]] = block


def _transpose_into(dst: np.ndarray, src: np.ndarray, pool: ThreadPoolExecutor) -> None:
    """``dst[...] = src.T``: float32 by oneDNN's reorder where it can (2–3× faster, see
    :mod:`.onednn`), else tile by tile, row bands in parallel (numpy copies release the GIL):
    numpy's strided copy of a large transpose misses the cache on every element (7x slower
    on a 92544x1024 table than cache-sized tiles)."""
    if src.dtype == np.float32 and onednn.available():
        try:
            onednn.transpose_into(dst, src)
            return
        except onednn.OneDNNError as err:
            logger.debug("oneDNN cannot transpose %s into %s (%s): tiled copy", src.shape, dst.shape, err)
    rows, cols = src.shape

    def band(start: int, stop: int) -> None:
        for i in range(start, stop, TRANSPOSE_TILE):
            for j in range(0, cols, TRANSPOSE_TILE):
                dst[j : j + TRANSPOSE_TILE, i : i + TRANSPOSE_TILE] = src[i : i + TRANSPOSE_TILE,
                                                                          j : j + TRANSPOSE_TILE].T

    step = TRANSPOSE_TILE * TILES_PER_BAND
    list(pool.map(lambda start: band(start, min(start + step, rows)), range(0, rows, step)))


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
    """Assign every tensor of ``files`` to ``model`` (strict), converting layout and dtype.

    Each tensor is converted block by block straight into the memory that becomes its
    parameter: peak memory is the model plus one block, not the model plus tensor copies.
    (A ``.pdparams`` pickle is read whole by nature; each array is freed once copied.)"""
    plan, absent = _plan(model, files, layout)
    params = model.state_dict()
    with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, MAX_COPY_THREADS))) as pool:
        _load_planned(model, plan, params, layout, dtype, pool)
    for name in absent:  # optional, unused tensors (post_layernorm) absent from the file
        if not params[name]._is_initialized():
            params[name].initialize()
        logger.debug("%s not in the checkpoint (unused by the model); left at its default", name)


def _load_planned(model, plan, params, layout: str, dtype: str, pool: ThreadPoolExecutor) -> None:
    for f, src, name in plan:
        param = params[name]
        info = f.infos()[src]
        transpose = layout == "hf" and is_linear_weight(name, len(info.shape))
        if list(info.shape if not transpose else info.shape[::-1]) != list(param.shape):
            _load_resized_position_table(model, param, f.read(src), dtype)
        else:
            tensor, view = _empty_buffer(param)
            if transpose or not f.read_into(src, view):
                _fill(view, f.row_blocks(src), transpose, pool)
            _adopt(param, tensor)


def _load_resized_position_table(model, param: paddle.Tensor, array: np.ndarray, dtype: str) -> None:
    """A CLIP position table for another image size (e.g. the original 24×24 grid)."""
    table = resize_position_table(paddle.to_tensor(_as_dtype(array, "float32")), model.config.image_grid)
    logger.info("resized the CLIP position table from %d to %d rows (img_size %d)", array.shape[0],
                table.shape[0], model.config.img_size)
    param.set_value(_to_paddle(table.numpy(), dtype))


def save_atomically(write: Callable[[str], None], save_dir: str, is_main_process: bool = True) -> None:
    """Run ``write(tmp_dir)``, then move its files into ``save_dir`` one ``os.replace`` each
    (atomic on one filesystem) and drop weight files of other formats from earlier saves."""
    os.makedirs(save_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".saving-", dir=save_dir)
    try:
        write(tmp)
        if not is_main_process:
            return
        written = set(os.listdir(tmp))
        for name in sorted(written):
            os.replace(os.path.join(tmp, name), os.path.join(save_dir, name))
        for name in os.listdir(save_dir):
            stale = name not in written and (name.startswith(("model_state", "model-", "model.safetensors",
                                                              "pytorch_model")))
            if stale and os.path.isfile(os.path.join(save_dir, name)):
                os.remove(os.path.join(save_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_weight_files(directory: str) -> List[CheckpointFile]:
    return [open_checkpoint_file(p) for p in find_weight_files(directory)]
