"""The body of ``POST /v1/chat/completions`` → a :class:`ChatRequest` the engine can run.

OpenAI messages become exactly the arguments of the official ``chat()``::

    system   → meta_instruction (no system message: the official default one)
    user     → a query; each ``image_url`` part becomes an ``<ImageHere>`` where it stands,
               text parts are joined with nothing between them
    assistant→ the answer of the previous user turn (history)

so ``[image, text "What shape?"]`` is the query ``"<ImageHere>What shape?"``, and images of
earlier turns keep their tags in the history (the model fills every tag of the prompt in order).
Every value is checked here, before anything is queued: a bad one is a 400 naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION, IMAGE_PLACEHOLDER

from .errors import bad_request

__all__ = ["ChatRequest", "Conversation", "OFFICIAL_DEFAULTS", "SamplingParams", "parse_chat_request"]

# The official ``chat()`` defaults (top_k unset there: transformers' default 50 applies).
OFFICIAL_DEFAULTS = dict(max_tokens=1024, do_sample=True, temperature=1.0, top_p=0.8, top_k=None,
                         repetition_penalty=1.005)
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_BEAMS = 8  # the official demo's slider goes to 5
SEED_LIMIT = 2**63
SYSTEM_ROLES = ("system", "developer")  # "developer" is OpenAI's newer name for the system message
# Fields OpenAI clients may send that this server accepts only at the value that changes nothing.
NEUTRAL_VALUES: Dict[str, Tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "store": (None, False),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "best_of": (None, 1), "ignore_eos": (None, False), "service_tier": (None, "auto", "default"),
}
ACCEPTED_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
    "stream", "stream_options", "top_k", "repetition_penalty", "do_sample", "num_beams",
    "user", "metadata",  # identifiers for the caller's own bookkeeping; they do not affect the answer
}


@dataclass
class SamplingParams:
    """Decoding settings of one request (the official ``chat()``'s names and defaults)."""

    max_tokens: int = OFFICIAL_DEFAULTS["max_tokens"]
    do_sample: bool = OFFICIAL_DEFAULTS["do_sample"]
    temperature: float = OFFICIAL_DEFAULTS["temperature"]
    top_p: float = OFFICIAL_DEFAULTS["top_p"]
    top_k: Optional[int] = OFFICIAL_DEFAULTS["top_k"]
    repetition_penalty: float = OFFICIAL_DEFAULTS["repetition_penalty"]
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    num_beams: int = 1  # > 1: the official chat's beam search (greedy only, as there)

    def batch_key(self, request_id: str) -> Tuple[Any, ...]:
        """Requests with equal keys can share one batched generation: ``generate_rows``
        applies one setting to the whole batch, and rows stop individually (so ``max_tokens``
        and ``stop`` may differ). A seeded request gets a key of its own, so its draws are
        exactly those of ``chat(..., seed=...)``; so does a beam search."""
        if self.seed is not None or self.num_beams > 1:
            return ("alone", request_id)
        if not self.do_sample:
            return ("greedy", self.repetition_penalty)
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty)

    def generation_kwargs(self, max_new_tokens: int) -> Dict[str, Any]:
        """Keyword arguments of ``model._settings`` for a batch whose longest row needs ``max_new_tokens``."""
        return dict(max_new_tokens=max_new_tokens, do_sample=self.do_sample, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty, seed=self.seed)


@dataclass
class Conversation:
    """``chat()``'s arguments; ``image_urls`` are ``(url, field name)`` in prompt order."""

    query: str
    history: List[Tuple[str, str]]
    meta_instruction: str
    image_urls: List[Tuple[str, str]]


@dataclass
class ChatRequest:
    model: str
    conversation: Conversation
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False


# --- messages ------------------------------------------------------------------------------------
def _text_of(content: Any, where: str, images: Optional[List[Tuple[str, str]]]) -> str:
    """A message's content as prompt text; image parts (only if ``images`` is given) become tags."""
    if isinstance(content, str):
        parts: Sequence[Any] = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    else:
        raise bad_request(f"{where} must be a string or a non-empty list of content parts", where)
    text = ""
    for i, part in enumerate(parts):
        name = f"{where}[{i}]" if isinstance(content, list) else where
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_PLACEHOLDER in part["text"]:
                raise bad_request(f"{name} contains {IMAGE_PLACEHOLDER}; send images as image_url content parts",
                                  name)
            text += part["text"]
        elif kind == "image_url" and images is not None:
            image = part.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
                raise bad_request(f"{name}.image_url must be an object with a non-empty string 'url'",
                                  f"{name}.image_url.url")
            images.append((image["url"], f"{name}.image_url.url"))
            text += IMAGE_PLACEHOLDER
        else:
            allowed = "'text' and 'image_url'" if images is not None else "'text'"
            raise bad_request(f"{name} must be a content part of type {allowed} (got {kind!r})", name)
    return text


def _conversation(messages: Any) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in (*SYSTEM_ROLES, "user", "assistant"):
            raise bad_request(f"messages[{i}] must be an object whose role is system, user or assistant",
                              f"messages[{i}].role")
    meta = DEFAULT_META_INSTRUCTION
    start = 0
    if messages[0]["role"] in SYSTEM_ROLES:
        meta, start = _text_of(messages[0].get("content"), "messages[0].content", None), 1
    turns = messages[start:]
    images: List[Tuple[str, str]] = []
    texts = []
    for offset, message in enumerate(turns):
        i = start + offset
        expected = "user" if offset % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise bad_request(f"messages[{i}] is {message['role']!r} but {expected!r} was expected: after an optional "
                              "system message, user and assistant messages alternate, ending with a user message",
                              f"messages[{i}].role")
        texts.append(_text_of(message.get("content"), f"messages[{i}].content", images if expected == "user" else None))
    if len(turns) % 2 == 0:
        raise bad_request("the last message must be a user message (the one to answer)", "messages")
    query = texts[-1]
    if not query.strip():
        raise bad_request(f"messages[{len(messages) - 1}] is empty; ask something", f"messages[{len(messages) - 1}]")
    history = [(texts[k], texts[k + 1]) for k in range(0, len(texts) - 1, 2)]
    return Conversation(query, history, meta, images)


# --- parameters ----------------------------------------------------------------------------------
def _number(body: Dict[str, Any], name: str, default: Any, low: float, high: float, integer: bool = False,
            low_open: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise bad_request(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise bad_request(f"{name} must be in {bracket}{low}, {high}], got {value!r}", name)
    return value


def _flag(body: Dict[str, Any], name: str, default: Optional[bool]) -> Optional[bool]:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(value: Any) -> List[str]:
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return list(stops)


def _max_tokens(body: Dict[str, Any]) -> int:
    limit = 2**31 - 1
    old = _number(body, "max_tokens", None, 1, limit, integer=True)
    new = _number(body, "max_completion_tokens", None, 1, limit, integer=True)
    if old is not None and new is not None and old != new:
        raise bad_request("max_tokens and max_completion_tokens disagree; send one of them", "max_completion_tokens")
    return new or old or OFFICIAL_DEFAULTS["max_tokens"]


def _sampling(body: Dict[str, Any]) -> SamplingParams:
    temperature = _number(body, "temperature", OFFICIAL_DEFAULTS["temperature"], 0, MAX_TEMPERATURE)
    do_sample = _flag(body, "do_sample", None)
    if do_sample and temperature == 0:
        raise bad_request("do_sample is true but temperature is 0 (greedy); drop one of them", "temperature")
    if do_sample is None:
        do_sample = OFFICIAL_DEFAULTS["do_sample"] and temperature > 0
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise bad_request(f"top_k must be a non-negative integer (0 disables it), got {top_k!r}", "top_k")
    seed = _number(body, "seed", None, -SEED_LIMIT, SEED_LIMIT - 1, integer=True)
    num_beams = _number(body, "num_beams", 1, 1, MAX_BEAMS, integer=True)
    if num_beams > 1 and do_sample:
        raise bad_request("num_beams > 1 is beam search, which does not sample: send temperature 0 or do_sample "
                          "false with it (as the official chat)", "num_beams")
    return SamplingParams(
        max_tokens=_max_tokens(body), do_sample=do_sample, temperature=float(temperature),
        top_p=float(_number(body, "top_p", OFFICIAL_DEFAULTS["top_p"], 0, 1, low_open=True)), top_k=top_k,
        repetition_penalty=float(_number(body, "repetition_penalty", OFFICIAL_DEFAULTS["repetition_penalty"], 0,
                                         math.inf, low_open=True)),
        seed=seed, stop=_stop(body.get("stop")), num_beams=num_beams)


def _check_fields(body: Dict[str, Any]) -> None:
    for name, value in body.items():
        if name in ACCEPTED_FIELDS:
            continue
        if name not in NEUTRAL_VALUES:
            raise bad_request(f"unsupported parameter {name!r}", name, code="unsupported_parameter")
        if value not in NEUTRAL_VALUES[name]:
            raise bad_request(f"{name}={value!r} is not supported by this server (only "
                              f"{', '.join(repr(v) for v in NEUTRAL_VALUES[name])})", name, code="unsupported_value")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad_request(f"n must be 1 (one answer per request), got {n!r}", "n", code="unsupported_value")


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate a decoded JSON body; raises :class:`~.errors.APIError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required (GET /v1/models lists the served one)", "model")
    stream = bool(_flag(body, "stream", False))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad_request("stream_options must be an object with at most 'include_usage'", "stream_options")
    include_usage = bool(_flag(options or {}, "include_usage", False))
    return ChatRequest(model, _conversation(body.get("messages")), _sampling(body), stream, include_usage)
