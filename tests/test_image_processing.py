"""Tests for image loading/preprocessing: golden parity with the official torchvision pipeline,
input kinds, and every failure path (files, corrupt data, huge images, URLs)."""
from __future__ import annotations

import http.server
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import loopback_server
from PIL import Image

from paddlemix.models.internlm_xcomposer2.image_processing import (
    DEFAULT_MAX_PIXELS,
    ImageLoadError,
    MAX_REDIRECTS,
    ImageNotFoundError,
    InternLMXComposer2ImageProcessor,
    load_image,
)

IMAGES = ("img1", "img2")


@pytest.fixture(scope="module")
def processor() -> InternLMXComposer2ImageProcessor:
    return InternLMXComposer2ImageProcessor()


def _golden(golden: dict, name: str) -> np.ndarray:
    return golden[f"{name}_pixel_values"]


def _png_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header declares ``width`` x ``height`` but holds almost no data.

    Writing a real 20000x20000 PNG with PIL would need ~1.2 GB of RAM; the loader must refuse from
    the header anyway, so the declared size is all that matters.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# --- golden parity ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", IMAGES)
def test_golden_from_path(processor, tiny_dir: Path, golden: dict, name: str) -> None:
    for src in (tiny_dir / f"{name}.png", str(tiny_dir / f"{name}.png")):
        out = processor(src)["pixel_values"]
        assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
        np.testing.assert_array_equal(out[0], _golden(golden, name))


@pytest.mark.parametrize("name", IMAGES)
def test_golden_from_bytes_and_pil(processor, tiny_dir: Path, golden: dict, name: str) -> None:
    path = tiny_dir / f"{name}.png"
    np.testing.assert_array_equal(processor(path.read_bytes())["pixel_values"][0], _golden(golden, name))
    with Image.open(path) as img:
        np.testing.assert_array_equal(processor(img)["pixel_values"][0], _golden(golden, name))


def test_golden_batch_and_paddle(processor, tiny_dir: Path, golden: dict) -> None:
    sources = [tiny_dir / "img1.png", (tiny_dir / "img2.png").read_bytes()]
    out = processor.preprocess(sources)["pixel_values"]
    assert out.shape == (2, 3, 224, 224)
    expected = np.stack([_golden(golden, n) for n in IMAGES])
    np.testing.assert_array_equal(out, expected)
    pd_out = processor(sources, return_tensors="pd")["pixel_values"]
    assert list(pd_out.shape) == [2, 3, 224, 224]
    np.testing.assert_array_equal(pd_out.numpy(), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "I;16", "CMYK"])
def test_modes_convert_to_rgb(processor, tiny_dir: Path, mode: str) -> None:
    with Image.open(tiny_dir / "img1.png") as src:
        img = src.convert(mode)
    loaded = load_image(img)
    assert loaded.mode == "RGB" and loaded.size == (300, 200)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    assert load_image(buf.getvalue()).mode == "RGB"
    assert processor(img)["pixel_values"].shape == (1, 3, 224, 224)


def test_palette_with_transparency_is_plain_converted(tiny_dir: Path) -> None:
    """Parity with the reference: transparency is dropped by ``convert("RGB")``, not composited on white."""
    with Image.open(tiny_dir / "img1.png") as src:
        img = src.convert("P")
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    loaded = load_image(buf.getvalue())
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(img.convert("RGB")))


def test_one_pixel_image_is_valid(processor) -> None:
    out = processor(Image.new("RGB", (1, 1), (255, 0, 0)))["pixel_values"]
    assert out.shape == (1, 3, 224, 224) and np.isfinite(out).all()


def test_img_size_490_and_config_roundtrip(tiny_dir: Path, tmp_path: Path) -> None:
    proc = InternLMXComposer2ImageProcessor.from_model_config({"img_size": 490})
    out = proc([tiny_dir / "img1.png", tiny_dir / "img2.png"])["pixel_values"]
    assert out.shape == (2, 3, 490, 490)
    config = json.loads((tiny_dir / "config.json").read_text(encoding="utf-8"))
    assert InternLMXComposer2ImageProcessor.from_model_config(config).img_size == config["img_size"]
    proc.save_pretrained(str(tmp_path))
    reloaded = InternLMXComposer2ImageProcessor.from_pretrained(str(tmp_path))
    assert reloaded.img_size == 490 and reloaded.image_mean == proc.image_mean
    np.testing.assert_array_equal(reloaded(tiny_dir / "img1.png")["pixel_values"], out[:1])


# --- local errors ----------------------------------------------------------------------------

def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageNotFoundError, match="nope.png") as info:
        load_image(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_text_file_named_png(tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("definitely not an image\n", encoding="utf-8")
    with pytest.raises(ImageLoadError, match="fake.png.*not an image"):
        load_image(fake)


def test_zero_byte_file_and_bytes(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.png"):
        load_image(empty)
    with pytest.raises(ImageLoadError, match="<bytes of length 0>"):
        load_image(b"")


def test_zero_size_image(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="zero-size"):
        load_image(Image.new("RGB", (0, 0)))
    with pytest.raises(ImageLoadError, match="bytes of length"):
        load_image(_png_header(0, 0))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tiny_dir: Path, tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    with Image.open(tiny_dir / "img1.png") as img:
        img.save(buf, format=fmt)
    data = buf.getvalue()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=f"cut.{fmt.lower()}.*truncated or corrupt"):
        load_image(cut)
    with pytest.raises(ImageLoadError, match=f"<bytes of length {len(data) // 2}>"):
        load_image(data[: len(data) // 2])


def test_unsupported_type() -> None:
    with pytest.raises(ImageLoadError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# --- huge images -----------------------------------------------------------------------------

def _peak_rss_mb() -> float:
    resource = pytest.importorskip("resource")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@pytest.mark.parametrize("size", [(9000, 8000), (10000, 10000), (20000, 20000)])
def test_huge_declared_size_refused_fast(tmp_path: Path, size: tuple) -> None:
    """9000x8000 trips our limit, 10000^2 PIL's bomb warning, 20000^2 PIL's bomb error: all clear errors."""
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(*size))
    before, start = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(ImageLoadError, match="huge.png") as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    assert _peak_rss_mb() - before < 100  # decoding would need >= 216 MB
    message = str(info.value)
    assert str(size[0] * size[1]) in message or f"{size[0]}x{size[1]}" in message


def test_max_pixels_limit(tiny_dir: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"300x200 = 60000 pixels, above the limit of 1000"):
        load_image(tiny_dir / "img1.png", max_pixels=1000)
    assert load_image(tiny_dir / "img1.png", max_pixels=300 * 200).size == (300, 200)
    assert DEFAULT_MAX_PIXELS == 8192 * 8192


def test_large_jpeg_decoded_with_draft(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1600), (10, 200, 30)).save(path, quality=90)
    img = load_image(path, max_pixels=500 * 400)
    assert img.size == (500, 400) and img.mode == "RGB"
    assert load_image(path, max_pixels=1000 * 800).size == (1000, 800)
    with pytest.raises(ImageLoadError, match="2000x1600"):
        load_image(path, max_pixels=100)  # even 1/8 (250x200) is too big


# --- URLs ------------------------------------------------------------------------------------

SLOW_SECONDS = 2.0


@pytest.fixture(scope="module")
def http_base(tiny_dir: Path) -> Iterator[str]:
    png = (tiny_dir / "img1.png").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            try:
                if self.path == "/img1.png":
                    self._send(200, "image/png", png)
                elif self.path == "/octet":
                    self._send(200, "application/octet-stream", b"<html>not an image</html>")
                elif self.path == "/page":
                    self._send(200, "text/html; charset=utf-8", b"<html><body>hi</body></html>")
                elif self.path.startswith("/hop/"):  # /hop/N redirects N times, then to the image
                    left = int(self.path.rsplit("/", 1)[1])
                    self.send_response(302)
                    self.send_header("Location", f"/hop/{left - 1}" if left > 1 else "/img1.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/slow":
                    time.sleep(SLOW_SECONDS)
                    self._send(200, "image/png", png)
                else:
                    self._send(404, "text/plain", b"not found")
            except (BrokenPipeError, ConnectionResetError):
                pass

    with loopback_server(Handler) as base:
        yield base


pytestmark = pytest.mark.usefixtures("loopback_no_proxy")


def test_url_golden(processor, http_base: str, golden: dict) -> None:
    out = processor(f"{http_base}/img1.png")["pixel_values"]
    np.testing.assert_array_equal(out[0], _golden(golden, "img1"))


def test_url_404(http_base: str) -> None:
    with pytest.raises(ImageLoadError, match=r"/missing.*HTTP 404"):
        load_image(f"{http_base}/missing")


def test_url_html_page(http_base: str) -> None:
    with pytest.raises(ImageLoadError, match=r"/page.*text/html.*web page"):
        load_image(f"{http_base}/page")
    with pytest.raises(ImageLoadError, match=r"/octet.*not an image"):
        load_image(f"{http_base}/octet")


def test_url_guard_sees_every_redirect_hop(processor, http_base: str, golden: dict) -> None:
    seen = []
    out = processor._to_pixels(load_image(f"{http_base}/hop/2", url_guard=seen.append))
    np.testing.assert_array_equal(out, _golden(golden, "img1"))  # the redirects were followed
    assert seen == [f"{http_base}/hop/2", f"{http_base}/hop/1", f"{http_base}/img1.png"]

    def refuse_the_image(url: str) -> None:  # a redirect target is vetted like the first URL
        if url.endswith("/img1.png"):
            raise ImageLoadError(f"{url} refused")
    with pytest.raises(ImageLoadError, match=r"img1.png refused"):
        load_image(f"{http_base}/hop/1", url_guard=refuse_the_image)
    with pytest.raises(ImageLoadError, match=rf"redirected more than {MAX_REDIRECTS} times"):
        load_image(f"{http_base}/hop/{MAX_REDIRECTS + 1}")


def test_url_timeout(http_base: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=r"/slow.*timed out after 0.5"):
        load_image(f"{http_base}/slow", timeout=0.5)
    assert time.perf_counter() - start < SLOW_SECONDS


def test_url_unreachable() -> None:
    with socket.socket() as sock:  # grab a free port, then close it so nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/img.png"
    with pytest.raises(ImageLoadError, match=rf"could not fetch '{url}'.*ConnectionError"):
        load_image(url, timeout=2.0)


@pytest.mark.parametrize("size, vertical_first", [((180, 260), True), ((300, 200), False), ((270, 300), False), ((260, 300), True),
                                                  ((100, 400), True), ((50, 60), False)])
def test_resize_runs_the_passes_in_pillow_13s_order(size, vertical_first):
    """Pillow 13 (the golden numbers) runs the vertical pass first when the height shrinks by more
    than twice as many pixels as the width; each pass rounds to 8 bits, so the order shows."""
    from paddlemix.models.internlm_xcomposer2.image_processing import resize_two_pass

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    target, bicubic = (224, 224), Image.Resampling.BICUBIC
    by_rows = image.resize((size[0], 224), bicubic).resize(target, bicubic)
    by_columns = image.resize((224, size[1]), bicubic).resize(target, bicubic)
    ours = np.asarray(resize_two_pass(image, target, bicubic))
    np.testing.assert_array_equal(ours, np.asarray(by_rows if vertical_first else by_columns))
    assert not np.array_equal(np.asarray(by_rows), np.asarray(by_columns))  # the order matters here
