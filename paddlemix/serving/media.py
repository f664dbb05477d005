"""``image_url.url`` → a decoded RGB image, or a 400 that says what is wrong with it.

Three kinds of URL, as OpenAI and vLLM accept them: ``http(s)://`` (fetched with the model
package's :func:`load_image`: timeouts, size limits, content checks), ``data:image/...;base64,``
(decoded here, then handed over as bytes) and, only when the server was started with
``--allowed-local-media-path DIR``, a local path or ``file://`` URL inside ``DIR``. Nothing
is ever replaced by a dummy image: an image that cannot be used refuses the request.

A client's URL is fetched by the server, from inside its network: unless the server was started
with ``--allow-private-media-urls``, every URL fetched (the given one and each redirect target)
must name a host whose addresses are all public, so that a request cannot make the server read
its own loopback services, the cloud metadata address (169.254.169.254) or the private network.
(The check resolves the name just before the fetch; a DNS answer that changes between the two is
not caught: a server on a network with sensitive services should also sit behind an egress proxy.)
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import os
import socket
from typing import Optional
from urllib.parse import unquote, urlparse

import urllib3
from PIL import Image

from paddlemix.models.internlm_xcomposer2.image_processing import (DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT,
                                                                   MAX_DOWNLOAD_BYTES, URL_SCHEMES, ImageLoadError,
                                                                   load_image)

from .errors import APIError, bad_request

logger = logging.getLogger(__name__)

__all__ = ["MediaLoader", "refuse_private_hosts"]

DATA_PREFIX = "data:"
FILE_SCHEME = "file://"
BASE64_FLAG = "base64"
IMAGE_MEDIA_TYPE = "image/"


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address):
        # an IPv4 address carried in IPv6 (mapped ::ffff:a.b.c.d, 6to4, Teredo) is judged as itself
        ip = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None) or ip
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _bare_host(host: Optional[str]) -> str:
    return (host or "").strip("[]").lower()  # urllib3 keeps an IPv6 literal's brackets


def refuse_private_hosts(url: str) -> None:
    """Raise :class:`ImageLoadError` unless every address ``url``'s host resolves to is public
    (not loopback, private, link-local, shared, reserved or multicast). The host is read as
    urllib3 (which makes the connection) reads it; a URL that ``urllib.parse`` reads as another
    host is ambiguous and refused. The check is at resolution time: a name whose addresses
    change between this check and the connection (DNS rebinding) is not caught."""
    try:
        parsed = urlparse(url)
        host = _bare_host(urllib3.util.parse_url(url).host)
        if host != _bare_host(parsed.hostname):
            raise ImageLoadError(f"{url[:80]!r} is ambiguous: its host reads differently to different parsers")
        if not host:
            raise ImageLoadError(f"{url[:80]!r} names no host")
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except ImageLoadError:
        raise
    except urllib3.exceptions.LocationParseError as err:
        raise ImageLoadError(f"{url[:80]!r} is not a valid URL ({err}); check it") from err
    except (OSError, ValueError) as err:  # unknown name, a malformed host or port
        raise ImageLoadError(f"could not resolve the host of {url[:80]!r} ({err}); check the URL") from err
    private = sorted(a for a in addresses if not _is_public(a))
    if private:
        raise ImageLoadError(f"{url[:80]!r} points to a non-public address ({', '.join(private)}); this server "
                             "fetches only public URLs (start it with --allow-private-media-urls to allow others)")


class MediaLoader:
    """Loads the images of requests under the server's limits.

    ``allowed_local_path``: the directory local paths must lie in (after resolving symlinks
    and ``..``); ``None`` refuses every local path. ``max_pixels``: width × height limit,
    checked from the header before decoding. ``max_bytes``: limit of a data URL's payload.
    ``allow_private_urls``: fetch http(s) URLs of loopback and private hosts too (a server on a
    trusted network, or tests); by default they are refused (:func:`refuse_private_hosts`).
    """

    def __init__(self, allowed_local_path: Optional[str] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 timeout: float = DEFAULT_TIMEOUT, max_bytes: int = MAX_DOWNLOAD_BYTES,
                 allow_private_urls: bool = False) -> None:
        if allowed_local_path is not None and not os.path.isdir(allowed_local_path):
            raise ValueError(f"--allowed-local-media-path {allowed_local_path!r} is not a directory")
        self.allowed_local_path = os.path.realpath(allowed_local_path) if allowed_local_path else None
        self.max_pixels, self.timeout, self.max_bytes = max_pixels, timeout, max_bytes
        self.url_guard = None if allow_private_urls else refuse_private_hosts

    def load(self, url: str, param: str) -> Image.Image:
        """The image at ``url``; ``param`` names the request field in errors."""
        if url.startswith(DATA_PREFIX):
            source, code = self._data_url(url, param), "invalid_image"
        elif url.lower().startswith(URL_SCHEMES):
            source, code = url, "invalid_image_url"
        else:
            source, code = self._local_path(url, param), "invalid_image"
        try:
            return load_image(source, timeout=self.timeout, max_pixels=self.max_pixels, url_guard=self.url_guard)
        except ImageLoadError as err:
            raise bad_request(f"{param}: {err}", param, code=code) from err

    def _data_url(self, url: str, param: str) -> bytes:
        header, comma, payload = url[len(DATA_PREFIX):].partition(",")
        media_type, *flags = header.split(";")
        if not comma or not media_type.lower().startswith(IMAGE_MEDIA_TYPE) or BASE64_FLAG not in flags:
            raise bad_request(f"{param} is a malformed data URL: expected data:image/<type>;base64,<data>", param,
                              code="invalid_image")
        payload = "".join(payload.split())  # line breaks are allowed in base64 text
        if len(payload) // 4 * 3 > self.max_bytes:
            raise bad_request(f"{param}: the data URL holds more than {self.max_bytes} bytes", param,
                              code="invalid_image")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad_request(f"{param} is a malformed data URL: its base64 data does not decode ({err})", param,
                              code="invalid_image") from err
        if not data:
            raise bad_request(f"{param}: the data URL is empty", param, code="invalid_image")
        return data

    def _local_path(self, url: str, param: str) -> str:
        if url.startswith(FILE_SCHEME):
            path = unquote(urlparse(url).path)
        elif "://" in url:
            raise bad_request(f"{param}: unsupported URL scheme in {url[:40]!r}; use http(s)://, a data:image URL "
                              "or (if the server allows it) a local path", param, code="invalid_image_url")
        else:
            path = url
        if self.allowed_local_path is None:
            raise APIError(400, f"{param}: local image paths are not allowed on this server (start it with "
                           "--allowed-local-media-path DIR to allow files under DIR)", param=param,
                           code="local_path_not_allowed")
        resolved = os.path.realpath(os.path.join(self.allowed_local_path, path))  # relative: inside DIR
        if os.path.commonpath([resolved, self.allowed_local_path]) != self.allowed_local_path:
            raise APIError(400, f"{param}: {path!r} is outside the allowed local media directory", param=param,
                           code="local_path_not_allowed")
        return resolved
