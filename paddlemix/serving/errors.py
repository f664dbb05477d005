"""Errors the server answers with, shaped as OpenAI's: ``{"error": {message, type, param, code}}``.

Every refusal of a request is an :class:`APIError` carrying its HTTP status, so that a handler
can raise it from anywhere (parsing, image loading, admission) and the app turns it into the
same JSON body OpenAI clients already know how to read (``openai.BadRequestError`` etc.).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["APIError", "bad_request", "error_body"]

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """A request the server refuses (or could not finish), with what the client needs to fix it."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    @classmethod
    def not_found_model(cls, name: str, served: str) -> "APIError":
        return cls(404, f"The model {name!r} does not exist; this server serves {served!r}.", param="model",
                   code="model_not_found")

    @classmethod
    def unauthorized(cls, message: str) -> "APIError":
        return cls(401, message, code="invalid_api_key")

    @classmethod
    def queue_full(cls, limit: int) -> "APIError":
        return cls(429, f"The server is busy: {limit} requests are already waiting (--max_queue); retry later.",
                   type="rate_limit_error", code="queue_full")

    @classmethod
    def internal(cls, message: str) -> "APIError":
        return cls(500, message, type="server_error", code="internal_error")


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = "invalid_value") -> APIError:
    """A 400 for a value the client sent; ``param`` names the field (``messages[1].content``)."""
    return APIError(400, message, param=param, code=code)


def error_body(message: str, type: str = INVALID_REQUEST, param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
