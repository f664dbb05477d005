"""The user's own image library: found on disk, encoded once, cached by file content.

Every image's projected vision features (``encode_img``: ``[P, H]``, what the decoder reads)
are kept in ``<cache dir>/<model fingerprint>/<sha256 of the file>.npy``. The fingerprint covers
what the features depend on — the vision tower and projector weights (a sample of every tensor),
the image size, tokens per image, the dtype — so another checkpoint never reads them; the file
hash means a changed file is encoded again and a renamed or copied one is not (``hashes.json``
remembers each file's hash with its size and mtime, so only new or touched files are read to hash
them). Files are written to a temporary name and renamed, so a crash never leaves a half-written entry.

An image that cannot be read (corrupt, truncated, not an image, no permission) is skipped and
reported with its path and the reason; it never stops the article.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle
from tqdm import tqdm

from paddlemix.models.internlm_xcomposer2.image_processing import ImageLoadError, InternLMXComposer2ImageProcessor

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "CACHE_DIRNAME", "SkippedImage", "LibraryStats", "ImageLibrary", "EmbeddingCache",
           "find_images", "file_sha256", "model_fingerprint", "open_library"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CACHE_DIRNAME = ".ixc2_cache"  # default cache, inside the library folder
CACHE_FORMAT = 1  # bump when the stored layout changes: old entries are then simply not found
FINGERPRINT_SAMPLE = 4096  # values sampled from every vision/projector tensor for the fingerprint
HASH_CHUNK = 1 << 20
HASHES_FILE = "hashes.json"


@dataclass
class SkippedImage:
    path: str
    reason: str


@dataclass
class LibraryStats:
    """What opening a library did: images found, files read to hash them (the others were
    unchanged since last time), encoded now, read from the cache, skipped."""

    found: int = 0
    hashed: int = 0
    encoded: int = 0
    cache_hits: int = 0
    skipped: List[SkippedImage] = field(default_factory=list)
    encode_seconds: float = 0.0

    @property
    def images_per_second(self) -> Optional[float]:
        return self.encoded / self.encode_seconds if self.encoded and self.encode_seconds > 0 else None


def find_images(directory: Union[str, Path], skip: Sequence[Path] = ()) -> List[Path]:
    """Every jpg/jpeg/png/webp file under ``directory`` (recursively, any case), sorted; the
    cache folder and any folder in ``skip`` are not searched."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image library {str(root)!r} is not a directory")
    skipped = {p.resolve() for p in skip}
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders
                               if d != CACHE_DIRNAME and (Path(folder) / d).resolve() not in skipped)
        found += [Path(folder) / f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str:
    """A hash of what image features depend on: the names, shapes, dtypes and a strided sample
    of the values of every vision tower and projector tensor, plus the image geometry. Cheap
    (a few thousand values per tensor), and changed by any fine-tuning of those weights."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}".encode())
    cfg = model.config
    digest.update(f"img_size {cfg.img_size} tokens {cfg.num_image_tokens} hidden {cfg.hidden_size}".encode())
    for prefix, layer in (("vit", model.vit), ("vision_proj", model.vision_proj)):
        for name, param in layer.named_parameters():
            flat = param.reshape([-1])
            step = max(1, int(flat.shape[0]) // FINGERPRINT_SAMPLE)
            sample = flat[::step].astype("float32").numpy()
            digest.update(f"{prefix}.{name} {list(param.shape)} {param.dtype}".encode())
            digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()


def feature_dtype(model: Any) -> Any:
    """The dtype ``encode_img`` returns: the projector's."""
    return model.vision_proj[0].weight.dtype


def _to_storage(features: paddle.Tensor) -> np.ndarray:
    """float32/float16 as they are; bfloat16 as its 16 bits (the top half of the float32 value, exact)."""
    if features.dtype == paddle.bfloat16:
        bits = features.astype("float32").numpy().view(np.uint32) >> 16
        return bits.astype(np.uint16)
    return features.numpy()


def _from_storage(array: np.ndarray, dtype: Any) -> paddle.Tensor:
    if array.dtype == np.uint16:
        return paddle.to_tensor((array.astype(np.uint32) << 16).view(np.float32)).astype(dtype)
    return paddle.to_tensor(array).astype(dtype)


class EmbeddingCache:
    """``<root>/<fingerprint>/<sha256>.npy``, one ``[P, H]`` array per distinct file content."""

    def __init__(self, root: Union[str, Path], fingerprint: str, shape: Tuple[int, int]) -> None:
        self.directory = Path(root) / fingerprint[:32]
        self.shape = tuple(shape)
        self.writable = True  # until a write fails: then warn once and stop trying

    def path(self, sha: str) -> Path:
        return self.directory / f"{sha}.npy"

    def get(self, sha: str) -> Optional[np.ndarray]:
        """The stored features, or None (absent, or unreadable/wrong shape: then re-encoded)."""
        path = self.path(sha)
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            logger.warning("cache entry %s is unreadable (%s); encoding the image again", path, err)
            return None
        if tuple(array.shape) != self.shape:
            logger.warning("cache entry %s has shape %s, expected %s; encoding the image again",
                           path, tuple(array.shape), self.shape)
            return None
        return array

    def put(self, sha: str, array: np.ndarray, about: Dict[str, Any]) -> bool:
        """Store atomically (temporary file + rename); False (and one warning) if it cannot be written."""
        if not self.writable:
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            info = self.directory / "info.json"
            if not info.exists():  # whole or absent, even if two processes race or one is killed
                _write_atomic(info, json.dumps(about, indent=1).encode("utf-8"))
            encoded = io.BytesIO()
            np.save(encoded, array)
            _write_atomic(self.path(sha), encoded.getvalue())
            return True
        except OSError as err:
            logger.warning("cannot write the embedding cache in %s (%s); features kept in memory only",
                           self.directory, err)
            self.writable = False
            return False


class ImageLibrary:
    """The readable library images and their features (from the cache files, or in memory when
    the cache could not be written). ``embeddings(indices)`` gives ``[k, P, H]`` in model dtype."""

    def __init__(self, paths: List[Path], hashes: List[str], cache: EmbeddingCache, dtype: Any,
                 stats: LibraryStats, in_memory: Dict[str, np.ndarray]) -> None:
        self.paths, self.hashes, self.cache, self.dtype, self.stats = paths, hashes, cache, dtype, stats
        self._in_memory = in_memory

    def __len__(self) -> int:
        return len(self.paths)

    def features(self, index: int) -> np.ndarray:
        sha = self.hashes[index]
        if sha in self._in_memory:
            return self._in_memory[sha]
        array = self.cache.get(sha)
        if array is None:
            raise OSError(f"the cached features of {self.paths[index]} disappeared from {self.cache.directory}")
        return array

    def embeddings(self, indices: Sequence[int]) -> paddle.Tensor:
        return _from_storage(np.stack([np.asarray(self.features(i)) for i in indices]), self.dtype)


class HashMemo:
    """``<cache root>/hashes.json``: each file's sha256 with the size and modification time (ns)
    it had, so a file whose size and mtime are unchanged is not read again. Any change of either
    (every edit, re-save or replacement) means the file is hashed, and so keyed, afresh."""

    def __init__(self, root: Path) -> None:
        self.path = root / HASHES_FILE
        self.entries: Dict[str, List[Any]] = {}
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            pass  # absent or damaged: everything is hashed again

    def sha256(self, path: Path, stats: LibraryStats) -> str:
        info = path.stat()
        key = str(path.resolve())
        known = self.entries.get(key)
        if isinstance(known, list) and known[:2] == [info.st_size, info.st_mtime_ns]:
            return known[2]
        sha = file_sha256(path)
        stats.hashed += 1
        self.entries[key] = [info.st_size, info.st_mtime_ns, sha]
        return sha

    def save(self) -> None:
        """Write the memo atomically, without the files that no longer exist (deleted or renamed:
        the memo would otherwise grow with every file the cache ever saw)."""
        self.entries = {key: entry for key, entry in self.entries.items() if os.path.exists(key)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.path, json.dumps(self.entries).encode("utf-8"))
        except OSError as err:
            logger.warning("cannot write %s (%s); files will be hashed again next time", self.path, err)


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file and a rename: readers see all or nothing.
    The file gets the permissions a plain ``open`` would give (``mkstemp`` makes it 0600, which
    would lock other users out of a shared cache)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _hash_all(paths: List[Path], memo: HashMemo, stats: LibraryStats) -> List[Tuple[Path, str]]:
    hashed = []
    for path in paths:
        try:
            hashed.append((path, memo.sha256(path, stats)))
        except OSError as err:
            stats.skipped.append(SkippedImage(str(path), f"cannot be read ({err.strerror or err})"))
    memo.save()
    return hashed


def _encode_missing(model: Any, todo: List[Tuple[Path, str]], cache: EmbeddingCache, batch_size: int,
                    progress: bool, stats: LibraryStats) -> Tuple[set, Dict[str, np.ndarray]]:
    """Encode the images without a cache entry, ``batch_size`` at a time, under a progress bar.
    Returns the hashes that failed to load and the features that could not be written."""
    processor = InternLMXComposer2ImageProcessor(img_size=model.config.img_size)
    about = {"img_size": model.config.img_size, "tokens": model.config.num_image_tokens,
             "dtype": str(feature_dtype(model))}
    failed, in_memory = set(), {}
    started = time.perf_counter()
    with tqdm(total=len(todo), desc="encoding library", unit="img", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            pixels, batch = [], []
            for path, sha in todo[start:start + batch_size]:
                try:
                    pixels.append(processor(str(path), return_tensors="np")["pixel_values"][0])
                    batch.append(sha)
                except ImageLoadError as err:
                    stats.skipped.append(SkippedImage(str(path), str(err)))
                    failed.add(sha)
            if pixels:
                with paddle.no_grad():
                    features = model.encode_img(paddle.to_tensor(np.stack(pixels)))
                for sha, row in zip(batch, features):
                    array = _to_storage(row)
                    if not cache.put(sha, array, about):
                        in_memory[sha] = array
                stats.encoded += len(batch)
            bar.update(len(todo[start:start + batch_size]))
    stats.encode_seconds = time.perf_counter() - started
    return failed, in_memory


def open_library(model: Any, directory: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None,
                 batch_size: int = 8, progress: bool = True) -> ImageLibrary:
    """Find the library's images, encode those not cached yet, and return them with their stats.
    Unreadable images are skipped (``stats.skipped``: path and reason, each also logged)."""
    root = Path(directory)
    cache_root = Path(cache_dir) if cache_dir is not None else root / CACHE_DIRNAME
    stats = LibraryStats()
    paths = find_images(root, skip=[cache_root])
    stats.found = len(paths)
    shape = (model.config.num_image_tokens, model.config.hidden_size)
    cache = EmbeddingCache(cache_root, model_fingerprint(model), shape)
    hashed = _hash_all(paths, HashMemo(cache_root), stats)
    todo, seen = [], set()
    for path, sha in hashed:
        if sha in seen:
            continue  # the same content twice: looked up and encoded once
        seen.add(sha)
        if cache.get(sha) is not None:
            stats.cache_hits += 1
        else:
            todo.append((path, sha))
    failed, in_memory = _encode_missing(model, todo, cache, batch_size, progress, stats)
    for item in stats.skipped:
        logger.warning("skipped library image %s: %s", item.path, item.reason)
    kept = [(path, sha) for path, sha in hashed if sha not in failed]
    logger.info("library %s: %d images, %d encoded, %d from the cache, %d skipped", root, len(kept),
                stats.encoded, stats.cache_hits, len(stats.skipped))
    dtype = feature_dtype(model)
    return ImageLibrary([p for p, _ in kept], [s for _, s in kept], cache, dtype, stats, in_memory)
