"""How the engine's worker thread hands results to whoever waits for a request.

The worker never blocks on a client: it ``put``s events on the request's channel and goes on.
An HTTP handler (asyncio) reads them from an :class:`AsyncChannel`; the in-process web demo (a
plain thread) from a :class:`SyncChannel`.
"""
from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, Union

from .errors import APIError

__all__ = ["AsyncChannel", "Channel", "Event", "Failed", "Finished", "SyncChannel", "TextDelta", "deliver"]


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    content: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass
class Failed:
    error: APIError


Event = Union[TextDelta, Finished, Failed]


class Channel(Protocol):
    def put(self, event: Event) -> None: ...


class AsyncChannel:
    """Events for a coroutine on ``loop``; ``put`` is safe from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: "asyncio.Queue[Event]" = asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (server shut down): nobody is listening any more
            pass

    async def get(self) -> Event:
        return await self.queue.get()


class SyncChannel:
    """Events for a thread that blocks on :meth:`get`."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[Event]" = queue.Queue()

    def put(self, event: Event) -> None:
        self.queue.put(event)

    def get(self, timeout: Optional[float] = None) -> Event:
        return self.queue.get(timeout=timeout)


def _put_all(pairs: List[Tuple["asyncio.Queue[Event]", Event]]) -> None:
    for queue_, event in pairs:
        queue_.put_nowait(event)


def deliver(items: Sequence[Tuple[Channel, Event]]) -> None:
    """Hand over one decode step's events together: one wake-up per event loop instead of one per
    event (each wake-up costs the loop a turn and the worker the GIL). Order per channel is kept."""
    by_loop: Dict[asyncio.AbstractEventLoop, List[Tuple["asyncio.Queue[Event]", Event]]] = {}
    for channel, event in items:
        if isinstance(channel, AsyncChannel):
            by_loop.setdefault(channel.loop, []).append((channel.queue, event))
        else:
            channel.put(event)
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
