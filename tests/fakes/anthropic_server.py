"""A local server that speaks the Anthropic Messages API (POST /v1/messages).

Replies have the real shape: id, type, role, model, content blocks (thinking
blocks first when asked), stop_reason, usage with the cache fields. Errors use
the API's body `{"type": "error", "error": {"type": ..., "message": ...}}`.
`proxy_page` and `raw_body` are what something in front of the API (a proxy,
a load balancer, a misrouted base URL) may answer instead: 200 with a body
that is not a Messages response.
"""
from __future__ import annotations

import json
from itertools import count
from typing import Any

from tests.fakes.http_server import FakeHttpServer, Received, Reply

PATH = "/v1/messages"
_ids = count(1)


def message_body(
    text: str | None = None,
    *,
    data: Any = None,
    model: str = "claude-opus-4-6",
    thinking: str | None = None,
    stop_reason: str = "end_turn",
    input_tokens: int = 100,
    output_tokens: int = 20,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
) -> dict[str, Any]:
    if data is not None:
        text = json.dumps(data)
    content: list[dict[str, Any]] = []
    if thinking is not None:
        content.append({"type": "thinking", "thinking": thinking, "signature": "EqQBCgIYAhIM"})
    if text is not None:
        content.append({"type": "text", "text": text})
    return {
        "id": f"msg_fake_{next(_ids):05d}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": cache_creation_input_tokens,
            "cache_read_input_tokens": cache_read_input_tokens,
        },
    }


def ok(text: str | None = None, **kwargs: Any) -> Reply:
    return Reply(200, message_body(text, **kwargs), headers={"request-id": "req_fake"})


def error(status: int, kind: str, message: str = "", headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, {"type": "error", "error": {"type": kind, "message": message or kind}}, headers=headers or {})


def overloaded() -> Reply:
    return error(529, "overloaded_error", "Overloaded")


def rate_limited(retry_after: str = "1") -> Reply:
    return error(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
                 headers={"retry-after": retry_after})


def proxy_page(status: int = 200, text: str = "Service temporarily unavailable") -> Reply:
    """A proxy's own HTML page (the base headers say text/plain for a str: this overrides them)."""
    return Reply(status, f"<html><head><title>{text}</title></head><body><h1>{text}</h1></body></html>",
                 headers={"Content-Type": "text/html; charset=utf-8"})


def raw_body(status: int, body: str, content_type: str = "application/json") -> Reply:
    """A body sent as is under the given content type (e.g. JSON cut off mid-way)."""
    return Reply(status, body.encode(), headers={"Content-Type": content_type})


class FakeAnthropic(FakeHttpServer):
    def script(self, *replies: Reply) -> None:
        self.route("POST", PATH, *replies)

    def handler(self, fn) -> None:  # fn(Received) -> Reply
        self.route("POST", PATH, fn)

    def bodies(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.calls("POST", PATH)]


__all__ = ["FakeAnthropic", "Received", "Reply", "error", "message_body", "ok", "overloaded", "proxy_page",
           "rate_limited", "raw_body"]
