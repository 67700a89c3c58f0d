"""A local server that speaks Perplexity's chat-completions API (POST /chat/completions)."""
from __future__ import annotations

import json
from typing import Any

from tests.fakes.http_server import FakeHttpServer, Reply

PATH = "/chat/completions"


def completion(content: str | dict, *, model: str = "sonar-pro", prompt_tokens: int = 200, completion_tokens: int = 150,
               citations: list[str] | None = None) -> Reply:
    text = content if isinstance(content, str) else json.dumps(content)
    return Reply(200, {
        "id": "pplx-fake-1", "model": model, "object": "chat.completion", "created": 1767225600,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        "citations": citations or ["https://example.org/news/1"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
    })


class FakePerplexity(FakeHttpServer):
    def script(self, *replies: Reply) -> None:
        self.route("POST", PATH, *replies)

    def bodies(self) -> list[dict[str, Any]]:
        return [r.json() for r in self.calls("POST", PATH)]
