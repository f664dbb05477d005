"""The server's default limits, in one light module (no Paddle, no FastAPI) so that the command
lines can show them in ``--help`` without loading either."""
from __future__ import annotations

__all__ = ["DEFAULT_BATCH_WAIT", "DEFAULT_MAX_BATCH_SIZE", "DEFAULT_MAX_BODY_BYTES", "DEFAULT_MAX_IMAGES",
           "DEFAULT_MAX_QUEUE", "DEFAULT_PORT", "MIB"]

MIB = 1024 * 1024
DEFAULT_PORT = 8000  # what vLLM and lmdeploy's OpenAI servers listen on
DEFAULT_MAX_BATCH_SIZE = 8  # rows decoded together at most
DEFAULT_MAX_QUEUE = 64  # requests waiting at most; one more is answered 429 at once
DEFAULT_BATCH_WAIT = 0.02  # seconds the oldest request waits for companions before its batch starts
DEFAULT_MAX_IMAGES = 8  # images per conversation
# A request body above this is refused (413) while it arrives, before it is parsed: a few
# base64 images and a long conversation fit many times over.
DEFAULT_MAX_BODY_BYTES = 64 * MIB
