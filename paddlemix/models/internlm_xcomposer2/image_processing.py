"""Image loading and preprocessing for InternLM-XComposer2.

The official model preprocesses with torchvision: ``Image.open(src).convert("RGB")``, then
``Resize((S, S), BICUBIC)`` on the PIL image, ``ToTensor()`` and ``Normalize(CLIP mean, std)``.
This module reproduces that pipeline bit for bit in NumPy (no torch), and makes loading robust:
every failure becomes an :class:`ImageLoadError` that names the input and says what to do, and
huge images are rejected from their header before any pixel is decoded.
"""
from __future__ import annotations

import io
import logging
import math
import os
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urljoin

import numpy as np
import requests
from PIL import Image, UnidentifiedImageError
from paddlenlp.transformers.image_processing_utils import BaseImageProcessor, BatchFeature

logger = logging.getLogger(__name__)

# 8192 x 8192 = 67M pixels: a decoded RGB image of that size already takes ~200 MB (x4 once
# converted to float32). Anything larger is almost surely a mistake or an attack, since the model
# only ever sees a 224x224 (7B) or 490x490 (vl-7b) resize of it. Lower than PIL's own
# ``Image.MAX_IMAGE_PIXELS`` (~89M), so our clear error fires before PIL's bomb warning.
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_TIMEOUT = 10.0  # seconds, for connecting to and each read from an image URL
# A download bigger than this cannot be an image we would accept; stop reading instead of buffering it.
MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
# JPEG can decode at 1/2, 1/4 or 1/8 scale directly (PIL ``draft``), at a fraction of the memory.
JPEG_DRAFT_SCALES = (2, 4, 8)
URL_SCHEMES = ("http://", "https://")
MAX_REDIRECTS = 5  # hops followed when fetching an image URL (each one passes the url_guard)

DEFAULT_IMG_SIZE = 224  # ``img_size`` of internlm-xcomposer2-7b; the vl-7b config says 490
# OpenAI CLIP normalisation constants, as hard-coded in the official ``vis_processor``.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
UINT8_MAX = 255.0  # torchvision ``ToTensor`` divides uint8 pixels by this

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]
# Called with every URL about to be fetched (the first and each redirect target); raises
# ImageLoadError to refuse it. A server uses it to keep clients away from its private network.
UrlGuard = Callable[[str], None]


class ImageLoadError(ValueError):
    """An image could not be loaded; the message names the input and what to do about it.

    A ``ValueError`` because the caller passed an unusable value (bad path, URL or data).
    """


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """A local image path does not exist.

    Also a ``FileNotFoundError`` so that callers which already handle missing files keep working.
    """


def _describe(source: Any) -> str:
    """Name ``source`` in error messages without dumping raw bytes into them."""
    if isinstance(source, (bytes, bytearray)):
        return f"<bytes of length {len(source)}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return repr(os.fspath(source)) if isinstance(source, os.PathLike) else repr(source)


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    """Reject empty or too-large images from the header alone, before anything is decoded.

    ``Image.open`` is lazy, so ``img.size`` is known while the pixel data is still on disk. For
    JPEG we instead ask libjpeg to decode at the smallest 1/2^k scale that fits (only for images
    that would otherwise be rejected, so normal-size images keep exact parity with the reference).
    """
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name} is a zero-size image ({width}x{height}); provide a non-empty image.")
    if width * height <= max_pixels:
        return
    if img.format == "JPEG":
        for scale in JPEG_DRAFT_SCALES:
            if math.ceil(width / scale) * math.ceil(height / scale) <= max_pixels:
                img.draft(img.mode, (max(1, width // scale), max(1, height // scale)))
                break
        if img.size[0] * img.size[1] <= max_pixels:
            logger.warning("%s is %dx%d; decoding it downscaled to %dx%d to stay under max_pixels=%d.",
                           name, width, height, img.size[0], img.size[1], max_pixels)
            return
    raise ImageLoadError(
        f"{name} is {width}x{height} = {width * height} pixels, above the limit of {max_pixels} pixels; "
        "downscale it before loading, or pass a larger max_pixels if you trust it."
    )


def _decode(fp: Union[str, io.BytesIO], name: str, max_pixels: int) -> Image.Image:
    """Open, size-check and fully decode an image so that corruption surfaces here, not later."""
    try:
        with warnings.catch_warnings():
            # Turn PIL's bomb warning into an exception so it becomes the same clear error below.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                _check_size(img, name, max_pixels)
                img.load()
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{name} was refused as a possible decompression bomb ({err}); downscale it "
                             "before loading (the hard cap is PIL.Image.MAX_IMAGE_PIXELS).") from err
    except PermissionError as err:
        raise ImageLoadError(f"{name} cannot be read (permission denied); check the file permissions.") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"{name} is not an image PIL can read; pass a PNG/JPEG/... file.") from err
    except Exception as err:  # PIL decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise ImageLoadError(f"{name} is truncated or corrupt ({type(err).__name__}: {err}); "
                             "re-download or re-export the image.") from err


def _fetch(url: str, timeout: float, url_guard: Optional[UrlGuard] = None) -> bytes:
    """Download ``url`` and return its body, turning every network failure into ImageLoadError.
    Redirects are followed here, hop by hop, so that ``url_guard`` sees every address fetched."""
    try:
        with requests.Session() as session:
            for _ in range(MAX_REDIRECTS + 1):
                # the guard vets the URL exactly as requests will connect to it (its own parsing,
                # e.g. of a backslash in the authority, differs from urllib.parse's)
                request = session.prepare_request(requests.Request("GET", url))
                if url_guard is not None:
                    url_guard(request.url)
                with session.send(request, timeout=timeout, stream=True, allow_redirects=False) as response:
                    if response.is_redirect:
                        url = urljoin(request.url, response.headers["Location"])
                        continue
                    return _read_body(url, response)
        raise ImageLoadError(f"{url!r} redirected more than {MAX_REDIRECTS} times; use the final image URL.")
    except ImageLoadError:
        raise  # the guard's refusal, or the body's
    except ValueError as err:  # a malformed URL (given, or in a redirect's Location)
        raise ImageLoadError(f"{url[:200]!r} is not a valid URL ({err}); check it.") from err
    except requests.Timeout as err:
        raise ImageLoadError(f"{url!r} timed out after {timeout} s; check the network or raise timeout.") from err
    except requests.RequestException as err:
        raise ImageLoadError(f"could not fetch {url!r} ({type(err).__name__}: {err}); check the URL and "
                             "the network.") from err


def _read_body(url: str, response: requests.Response) -> bytes:
    if not 200 <= response.status_code < 300:
        raise ImageLoadError(f"{url!r} returned HTTP {response.status_code} {response.reason}; check the URL.")
    content_type = response.headers.get("Content-Type", "")
    if content_type.lower().startswith("text/"):
        raise ImageLoadError(f"{url!r} returned {content_type!r}, not an image; it is probably a web "
                             "page: use the direct link to the image file.")
    chunks, total = [], 0
    for chunk in response.iter_content(DOWNLOAD_CHUNK_BYTES):
        total += len(chunk)
        if total > MAX_DOWNLOAD_BYTES:
            raise ImageLoadError(f"{url!r} is larger than {MAX_DOWNLOAD_BYTES} bytes; download and "
                                 "downscale it first.")
        chunks.append(chunk)
    return b"".join(chunks)


def load_image(source: ImageSource, *, timeout: float = DEFAULT_TIMEOUT, max_pixels: int = DEFAULT_MAX_PIXELS,
               url_guard: Optional[UrlGuard] = None) -> Image.Image:
    """Load ``source`` as an RGB PIL image, exactly like the reference's ``.convert("RGB")``.

    ``source`` is a local path (``str`` or path-like), an ``http(s)://`` URL, raw encoded ``bytes``
    or an already-open ``PIL.Image.Image``. Alpha is dropped by plain conversion, not composited,
    for parity with the official model. Raises :class:`ImageLoadError` (:class:`ImageNotFoundError`
    for a missing path) for anything unusable, including encoded images above ``max_pixels`` (a PIL
    image is already decoded, so it is only converted). ``timeout`` is per connect/read, in seconds;
    ``url_guard`` vets each URL fetched (the given one and every redirect target).
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        if source.width <= 0 or source.height <= 0:
            raise ImageLoadError(f"{name} is a zero-size image; provide a non-empty image.")
        try:
            return source.convert("RGB")
        except Exception as err:  # a lazily opened image may only fail now, on first decode
            raise ImageLoadError(f"{name} cannot be decoded ({err}); re-open it from a valid file.") from err
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageLoadError(f"{name} is empty; pass the encoded image file contents.")
        return _decode(io.BytesIO(bytes(source)), name, max_pixels)
    if isinstance(source, str) and source.lower().startswith(URL_SCHEMES):
        return _decode(io.BytesIO(_fetch(source, timeout, url_guard)), name, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageLoadError(f"cannot load an image from {type(source).__name__} {name}; pass a path, "
                             "URL, bytes or PIL image.")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ImageNotFoundError(f"image file {name} does not exist; check the path.")
    if os.path.isdir(path):
        raise ImageLoadError(f"{name} is a directory, not an image file; pass the path of an image inside it.")
    return _decode(path, name, max_pixels)


def resize_two_pass(image: Image.Image, size: Tuple[int, int], resample: int) -> Image.Image:
    """``image.resize(size, resample)`` exactly as Pillow 13 computes it, on any Pillow version.

    Pillow resizes separably, in two passes that each round to 8 bits, so the result depends on
    their order. Pillow 13 (the official fixture's numbers) runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width (``h - H > 2 (w - W)``,
    ``ImagingResampleInner``); earlier Pillows always run the horizontal one first, which moves
    pixels of e.g. a 180×260 image by up to 7/255. Each pass is one single-axis ``resize``, whose
    arithmetic is the same in both (checked bit for bit on random sizes)."""
    (w, h), (width, height) = image.size, size
    if h - height > 0 and h - height > (w - width) * 2:
        return image.resize((w, height), resample=resample).resize((width, height), resample=resample)
    return image.resize((width, h), resample=resample).resize((width, height), resample=resample)


class InternLMXComposer2ImageProcessor(BaseImageProcessor):
    """Turns images into the ``pixel_values`` the InternLM-XComposer2 vision tower expects.

    Mirrors the official torchvision ``vis_processor``; ``img_size`` must match the model config's
    ``img_size``. Saved/loaded as ``preprocessor_config.json`` via ``save_pretrained``/``from_pretrained``.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, img_size: int = DEFAULT_IMG_SIZE, image_mean: Sequence[float] = CLIP_IMAGE_MEAN,
                 image_std: Sequence[float] = CLIP_IMAGE_STD, resample: int = Image.Resampling.BICUBIC,
                 max_pixels: int = DEFAULT_MAX_PIXELS, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(img_size) <= 0:
            raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
        self.img_size = int(img_size)
        # Tuples/ints rather than enums and arrays so that the JSON round trip is lossless.
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.resample = int(resample)
        self.max_pixels = int(max_pixels)
        self.timeout = float(timeout)

    @classmethod
    def from_model_config(cls, config_or_img_size: Any, **kwargs: Any) -> "InternLMXComposer2ImageProcessor":
        """Build a processor from a model config (object or dict with ``img_size``) or a bare size."""
        if isinstance(config_or_img_size, int):
            img_size = config_or_img_size
        elif isinstance(config_or_img_size, dict):
            img_size = config_or_img_size.get("img_size", DEFAULT_IMG_SIZE)
        else:
            img_size = getattr(config_or_img_size, "img_size", DEFAULT_IMG_SIZE)
        return cls(img_size=img_size, **kwargs)

    def _to_pixels(self, image: Image.Image) -> np.ndarray:
        """Resize + ToTensor + Normalize, in torchvision's float32 order of operations -> [3, S, S]."""
        resized = resize_two_pass(image, (self.img_size, self.img_size), self.resample)
        pixels = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(UINT8_MAX)
        pixels = (pixels - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def preprocess(self, images: Union[ImageSource, List[ImageSource]], return_tensors: Optional[str] = "np",
                   **kwargs: Any) -> BatchFeature:
        """Load and preprocess one source or a list of them into ``pixel_values`` [n, 3, S, S] float32.

        ``return_tensors`` is ``"np"`` (NumPy) or ``"pd"`` (Paddle). ``timeout``/``max_pixels`` may be
        overridden per call; they are passed on to :func:`load_image`.
        """
        timeout = kwargs.pop("timeout", self.timeout)
        max_pixels = kwargs.pop("max_pixels", self.max_pixels)
        if kwargs:
            raise TypeError(f"unexpected arguments to preprocess: {sorted(kwargs)}")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("images is an empty list; pass at least one image.")
        pixels = [self._to_pixels(load_image(src, timeout=timeout, max_pixels=max_pixels)) for src in batch]
        return BatchFeature(data={"pixel_values": np.stack(pixels)}, tensor_type=return_tensors)


__all__ = ["DEFAULT_MAX_PIXELS", "ImageLoadError", "ImageNotFoundError", "InternLMXComposer2ImageProcessor",
           "load_image", "resize_two_pass"]
