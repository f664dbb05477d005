"""Build the engine and the app, and run uvicorn (in the foreground, or in a
background thread for tests, benchmarks and the web demo)."""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Optional, Sequence, Tuple

import uvicorn

from .app import ServerConfig, create_app
from .engine import Engine
from .limits import (DEFAULT_BATCH_WAIT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES,
                     DEFAULT_MAX_QUEUE)
from .media import MediaLoader

logger = logging.getLogger(__name__)

__all__ = ["ServerThread", "build_server", "default_model_name", "free_port"]

START_TIMEOUT = 30.0  # seconds uvicorn may take to bind


def default_model_name(path_or_id: str) -> str:
    """The served model id: the checkpoint's directory name (the last part of a hub id)."""
    return os.path.basename(os.path.normpath(path_or_id)) or path_or_id


def build_server(model: Any, tokenizer: Any, model_name: str, api_keys: Sequence[str] = (),
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_queue: int = DEFAULT_MAX_QUEUE, max_images: int = DEFAULT_MAX_IMAGES, batch_wait: float = DEFAULT_BATCH_WAIT,
                 media: Optional[MediaLoader] = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 weight_packing: str = "auto") -> Tuple[Any, Engine]:
    """The FastAPI app and its started engine (one model in memory, one worker thread)."""
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be > 0, got {max_body_bytes}")
    engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                    batch_wait=batch_wait, weight_packing=weight_packing).start()
    config = ServerConfig(model_name=model_name, api_keys=tuple(api_keys), max_images=max_images,
                          max_body_bytes=max_body_bytes, media=media or MediaLoader())
    return create_app(engine, config), engine


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    # access_log off: the engine logs one line per request (id, tokens, time), never the prompt
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off")


class ServerThread:
    """uvicorn serving ``app`` from a daemon thread: ``with ServerThread(app) as base_url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: Optional[int] = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn_config(app, self.host, self.port))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(START_TIMEOUT)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
