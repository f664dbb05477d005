"""Streaming readers for checkpoint files, tensor by tensor, without torch.

Each reader lists ``name → (shape, dtype)`` from the file's header first, then reads
one tensor at a time with a positioned read into a fresh array. Nothing is memory
mapped (mapped pages count towards the process's resident memory), so loading a model
holds the model plus one tensor, never the whole file.

* ``.safetensors``: header JSON + raw little-endian data.
* ``pytorch_model*.bin``: torch's zip format (``archive/data.pkl`` + one uncompressed
  ``archive/data/<key>`` member per storage), unpickled with stand-ins for torch's
  classes, so torch is not needed.
* ``.pdparams``: a pickle of ``name → ndarray`` (``paddle.save``); inherently whole-file.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "TensorInfo", "open_checkpoint_file", "CheckpointFile"]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16,
    "BOOL": np.bool_,
}
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_ZIP_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # fixed part of a zip local file header
BLOCK_BYTES = 64 * 1024**2  # reading granularity: bounds the transient memory of a conversion


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as what it claims to be; names the file."""


@dataclass(frozen=True)
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: np.dtype


class CheckpointFile:
    """Common interface: ``infos()`` (cheap, header only) and ``read(name)`` (one tensor)."""

    path: str

    def infos(self) -> Dict[str, TensorInfo]:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def metadata(self) -> Dict[str, str]:
        return {}

    def row_blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[Tuple[int, np.ndarray]]:
        """``(first row, rows)`` blocks of the tensor along its first axis, each at most about
        ``max_bytes``, so a caller can convert/transpose a huge tensor without a full-size copy."""
        yield 0, self.read(name)

    def read_into(self, name: str, out: np.ndarray) -> bool:
        """Read the tensor straight into ``out`` if it is stored contiguously with ``out``'s
        dtype and shape (no intermediate copy); return False when that is not possible."""
        return False

    def _contiguous_blocks(self, offset: int, dtype: np.dtype, shape: Tuple[int, ...],
                           max_bytes: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Row blocks of a C-contiguous tensor stored at byte ``offset`` of the file, read into
        one reused buffer (each block is valid until the next one is requested)."""
        rows = shape[0] if shape else 1
        row_items = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        step = max(1, min(rows, max_bytes // max(row_items * dtype.itemsize, 1)))
        buffer = np.empty(step * row_items, dtype=dtype)
        with open(self.path, "rb") as f:
            for first in range(0, rows, step):
                count = min(step, rows - first)
                block = buffer[: count * row_items]
                self._readinto(f, offset + first * row_items * dtype.itemsize, block)
                yield first, block.reshape((count,) + tuple(shape[1:]) if shape else ())

    def _readinto(self, f, offset: int, out: np.ndarray) -> None:
        f.seek(offset)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{self.path}: truncated file (tensor data ends past the end of the file)")
            done += n

    def _read_contiguous_into(self, offset: int, dtype: np.dtype, shape: Tuple[int, ...], out: np.ndarray) -> bool:
        if out.dtype != dtype or tuple(out.shape) != tuple(shape) or not out.flags.c_contiguous:
            return False
        with open(self.path, "rb") as f:
            self._readinto(f, offset, out)
        return True

    def _fromfile(self, dtype: Any, count: int, offset: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(offset)
            out = np.fromfile(f, dtype=dtype, count=count)
        if out.size != count:
            raise CheckpointError(f"{self.path}: truncated file (tensor data ends past the end of the file)")
        return out


class SafetensorsFile(CheckpointFile):
    def __init__(self, path: str) -> None:
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
        self._meta = header.pop("__metadata__", None) or {}
        self._infos: Optional[Dict[str, TensorInfo]] = None
        self._data_start = 8 + header_len
        self._entries = header
        for name, entry in header.items():
            if entry.get("dtype") not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry.get('dtype')!r}")
            if self._data_start + entry["data_offsets"][1] > size:
                raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends past the end of the file")

    def metadata(self) -> Dict[str, str]:
        return dict(self._meta)

    def infos(self) -> Dict[str, TensorInfo]:
        if self._infos is None:
            self._infos = {n: TensorInfo(tuple(e["shape"]), np.dtype(_SAFETENSORS_DTYPES[e["dtype"]]))
                           for n, e in self._entries.items()}
        return self._infos

    def read(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if (end - begin) != count * dtype.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} byte size does not match its shape")
        return self._fromfile(dtype, count, self._data_start + begin).reshape(entry["shape"])

    def row_blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[Tuple[int, np.ndarray]]:
        entry = self._entries[name]
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        yield from self._contiguous_blocks(self._data_start + entry["data_offsets"][0], dtype,
                                           tuple(entry["shape"]), max_bytes)

    def read_into(self, name: str, out: np.ndarray) -> bool:
        entry = self._entries[name]
        return self._read_contiguous_into(self._data_start + entry["data_offsets"][0],
                                          np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]]), tuple(entry["shape"]), out)


@dataclass
class _TorchStorage:
    key: str
    dtype: Any
    numel: int


@dataclass
class _TorchTensor:
    storage: _TorchStorage
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor(storage, offset, size, stride, *_args) -> _TorchTensor:
    return _TorchTensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args) -> Any:
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles torch's ``data.pkl`` into lazy tensor descriptors, allowing only the
    handful of globals a state dict needs (no arbitrary code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise pickle.UnpicklingError(f"unsupported global {module}.{name} in a torch checkpoint")

    def persistent_load(self, pid: Any) -> _TorchStorage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or storage_type not in _TORCH_STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        return _TorchStorage(str(key), _TORCH_STORAGE_DTYPES[storage_type], int(numel))


class TorchZipFile(CheckpointFile):
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if pkl is None:
                    raise CheckpointError(f"{path}: no data.pkl inside; not a torch checkpoint")
                self._prefix = pkl[: -len("data.pkl")]
                state = _TorchUnpickler(zf.open(pkl)).load()
                self._members = {i.filename: i for i in zf.infolist()}
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, KeyError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: the pickle holds a {type(state).__name__}, not a state dict")
        self._tensors: Dict[str, _TorchTensor] = {k: v for k, v in state.items() if isinstance(v, _TorchTensor)}

    def infos(self) -> Dict[str, TensorInfo]:
        return {n: TensorInfo(t.shape, np.dtype(t.storage.dtype)) for n, t in self._tensors.items()}

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            fields = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
        name_len, extra_len = fields[-2], fields[-1]
        return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len

    def row_blocks(self, name: str, max_bytes: int = BLOCK_BYTES) -> Iterator[Tuple[int, np.ndarray]]:
        t = self._tensors[name]
        if t.stride != _contiguous_strides(t.shape):  # a view of a larger storage: read it whole
            yield 0, self.read(name)
            return
        dtype = np.dtype(t.storage.dtype)
        start = self._data_offset(self._member(name)) + t.offset * dtype.itemsize
        yield from self._contiguous_blocks(start, dtype, t.shape, max_bytes)

    def read_into(self, name: str, out: np.ndarray) -> bool:
        t = self._tensors[name]
        if t.stride != _contiguous_strides(t.shape):
            return False
        dtype = np.dtype(t.storage.dtype)
        start = self._data_offset(self._member(name)) + t.offset * dtype.itemsize
        return self._read_contiguous_into(start, dtype, t.shape, out)

    def _member(self, name: str) -> zipfile.ZipInfo:
        t = self._tensors[name]
        info = self._members.get(f"{self._prefix}data/{t.storage.key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage of tensor {name!r} is missing or compressed")
        return info

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        info = self._members.get(f"{self._prefix}data/{t.storage.key}")
        if info is None or info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.path}: storage of tensor {name!r} is missing or compressed")
        dtype = np.dtype(t.storage.dtype)
        storage = self._fromfile(dtype, t.storage.numel, self._data_offset(info))
        item = dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[t.offset :], shape=t.shape, strides=tuple(s * item for s in t.stride)
        )
        return np.ascontiguousarray(view) if not view.flags.c_contiguous or view.size != storage.size else view


class PdparamsFile(CheckpointFile):
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                state = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
            raise CheckpointError(f"{path}: cannot read as a Paddle .pdparams file ({type(err).__name__}: {err})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
        self._arrays = {k: np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray) or hasattr(v, "numpy")}

    def infos(self) -> Dict[str, TensorInfo]:
        return {n: TensorInfo(tuple(a.shape), a.dtype) for n, a in self._arrays.items()}

    def read(self, name: str) -> np.ndarray:
        return self._arrays.pop(name)  # hand over ownership: the file's copy is not kept


def _contiguous_strides(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def open_checkpoint_file(path: str) -> CheckpointFile:
    """Open one weights file by its extension, with a clear error for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(".bin") or path.endswith(".pt") or path.endswith(".pth"):
        return TorchZipFile(path)
    if path.endswith(".pdparams"):
        return PdparamsFile(path)
    raise CheckpointError(f"{path}: unknown weights file type (expected .safetensors, .bin or .pdparams)")


def iter_tensors(files: List[CheckpointFile]) -> Iterator[Tuple[CheckpointFile, str, TensorInfo]]:
    for f in files:
        for name, info in f.infos().items():
            yield f, name, info
