"""Where the web chat's answers come from: the engine in this process, or a running server.

Both take the same OpenAI request body (messages with ``data:`` image URLs, sampling fields),
so the page builds one conversation format and either backend answers it with the server's
own parsing, validation and limits. Both yield text deltas; a refusal raises :class:`ChatError`
with the server's message.
"""
from __future__ import annotations

import base64
import logging
import mimetypes
import os
import queue
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .channels import Failed, Finished, SyncChannel, TextDelta
from .engine import Engine, Job
from .errors import APIError
from .media import MediaLoader
from .protocol import parse_chat_request

logger = logging.getLogger(__name__)

__all__ = ["ChatError", "EngineBackend", "OpenAIBackend", "Turn", "build_messages", "data_url"]

Turn = Dict[str, Any]  # {"images": [paths], "text": str, "answer": str or None}
EVENT_TIMEOUT = 600.0  # seconds without any event from the engine before the page gives up


class ChatError(Exception):
    """The backend refused or failed the request; the message is the server's."""


def data_url(path: str) -> str:
    """An uploaded file as a ``data:image/...;base64,`` URL (what the server accepts from anyone)."""
    kind = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as f:
        return f"data:{kind};base64,{base64.b64encode(f.read()).decode()}"


def build_messages(turns: Sequence[Turn], system: Optional[str]) -> List[Dict[str, Any]]:
    """The conversation as OpenAI messages: each turn's images first, then its text (the layout
    the official chat puts an untagged image in), and the answers so far."""
    messages: List[Dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
    for turn in turns:
        parts: List[Dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in turn["images"]]
        if turn["text"]:
            parts.append({"type": "text", "text": turn["text"]})
        messages.append({"role": "user", "content": parts})
        if turn.get("answer") is not None:
            messages.append({"role": "assistant", "content": turn["answer"]})
    return messages


class EngineBackend:
    """The engine of this process (the same batcher the API server runs)."""

    def __init__(self, engine: Engine, model_name: str, media: Optional[MediaLoader] = None) -> None:
        self.engine, self.model_name, self.media = engine, model_name, media or MediaLoader()

    def stream(self, messages: List[Dict[str, Any]], params: Dict[str, Any]) -> Iterator[str]:
        try:
            chat = parse_chat_request({"model": self.model_name, "messages": messages, "stream": True, **params})
            images = [self.media.load(url, name) for url, name in chat.conversation.image_urls]
            prompt_tokens = self.engine.count_prompt(chat.conversation, len(images), chat.sampling.max_tokens)
            job = Job(self.engine.new_id(), chat.conversation, images, chat.sampling, prompt_tokens, SyncChannel(),
                      stream=True)
            self.engine.submit(job)
        except APIError as err:
            raise ChatError(err.message) from err
        try:
            while True:
                try:
                    event = job.channel.get(timeout=EVENT_TIMEOUT)
                except queue.Empty:  # the finally below cancels the row
                    raise ChatError(f"no answer within {EVENT_TIMEOUT:.0f} s; the server is overloaded or stuck"
                                    ) from None
                if isinstance(event, TextDelta):
                    yield event.text
                elif isinstance(event, Finished):
                    return
                elif isinstance(event, Failed):
                    raise ChatError(event.error.message)
        finally:  # the page stopped listening (closed, cleared, regenerated): stop the row
            if not job.done:
                self.engine.cancel(job)


class OpenAIBackend:
    """A running OpenAI-compatible server (this package's ``serve.py``, or any other)."""

    def __init__(self, api_base: str, api_key: Optional[str] = None, model: Optional[str] = None) -> None:
        import openai

        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = openai.OpenAI(base_url=api_base, api_key=key, max_retries=0)
        self.errors = openai.APIError
        try:
            self.model_name = model or self.client.models.list().data[0].id
        except (openai.APIError, IndexError) as err:
            raise ValueError(f"cannot list the models of {api_base} ({err}); check --api_base and --api_key") from err

    def stream(self, messages: List[Dict[str, Any]], params: Dict[str, Any]) -> Iterator[str]:
        standard = {k: v for k, v in params.items() if k in ("max_tokens", "temperature", "top_p", "seed", "stop")}
        extra = {k: v for k, v in params.items() if k not in standard}
        try:
            with self.client.chat.completions.create(model=self.model_name, messages=messages, stream=True,
                                                     extra_body=extra, **standard) as chunks:  # closed early too
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content
        except self.errors as err:
            raise ChatError(getattr(err, "message", None) or str(err)) from err
