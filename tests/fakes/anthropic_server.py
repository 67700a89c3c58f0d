"""A local server that speaks the Anthropic Messages API (POST /v1/messages).

Replies have the real shape: id, type, role, model, content blocks (thinking
blocks first when asked), stop_reason, usage with the cache fields. Errors use
the API's body `{"type": "error", "error": {"type": ..., "message": ...}}`.
`proxy_page` and `raw_body` are what something in front of the API (a proxy,
a load balancer, a misrouted base URL) may answer instead: 200 with a body
that is not a Messages response.

Scripted replies carry whatever usage a test gives them. `HonestModel` is a
handler that answers like a model and bills like the API (issue 20's load and
cost benchmarks, and tests that need a model that takes its time): see its
docstring for how it counts.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable

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


# --- HonestModel --------------------------------------------------------------------------------------------------

# The API's minimum cacheable prefix per model (tokens). Anthropic's prompt-caching page: 4,096 for Opus 4.6/4.5 and
# Haiku 4.5; for the 5.5 models no figure was found, so the Opus 5 family's 512 and Sonnet 5's 1,024 are used.
CACHE_MIN_TOKENS = {"claude-opus-4-6": 4096, "claude-haiku-4-5-20251001": 4096, "claude-opus-5-5": 512,
                    "claude-sonnet-5-5": 1024, "claude-haiku-5-5": 1024}
CACHE_TTL_SECONDS = 300.0  # the 5-minute cache, refreshed by every read


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


@dataclass
class Latency:
    """Seconds a model takes to answer, per purpose: a log-normal around `median`; `tail_share` of the calls take
    `tail` seconds instead (an analyst that thinks long). `scale` compresses time for a shorter benchmark."""

    median: float
    sigma: float = 0.35
    tail_share: float = 0.0
    tail: float = 0.0

    def draw(self, rng: random.Random, scale: float) -> float:
        if self.tail_share and rng.random() < self.tail_share:
            return self.tail * scale
        return _lognormal(rng, self.median, self.sigma) * scale


# The latencies: the screener p50 1 s; the analyst p50 20 s with 5% at 60 s; reflection like the analyst.
REALISTIC_LATENCY = {"screen": Latency(1.0, 0.3), "analyze": Latency(20.0, 0.35, 0.05, 60.0),
                     "post_trade": Latency(12.0, 0.3), "deep_reflection": Latency(40.0, 0.3)}
# Thinking tokens when thinking is on (adaptive on the 5.5 models; a budget on 4.x): medians by purpose and effort.
THINKING_MEDIAN = {("screen", "low"): 60, ("screen", "medium"): 180, ("position_check", "low"): 60,
                   ("position_check", "medium"): 180, ("analyze", "low"): 400,
                   ("analyze", "medium"): 1200, ("analyze", "high"): 2500, ("post_trade", "medium"): 700,
                   ("deep_reflection", "medium"): 2500}


@dataclass
class ModelCall:
    purpose: str
    model: str
    input_tokens: int
    output_tokens: int
    thinking_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    latency_s: float
    answer: dict[str, Any] = field(default_factory=dict)


class HonestModel:
    """A handler for FakeAnthropic that answers valid screener, analyst and reflection JSON and bills honestly.

    - Tokens are counted from the request: characters / 3.6 (Haiku 5.5's tokenizer counts 1.3x as many), over the
      system blocks and the messages; the output is the answer's characters / 3.6 plus the thinking tokens.
    - Cache: a prefix is cached only when a system block carries `cache_control` and the prefix up to it reaches the
      model's minimum (`CACHE_MIN_TOKENS`); the first request writes it (cache_creation_input_tokens), a request
      with the byte-identical prefix within 5 minutes of the last use reads it (cache_read_input_tokens). Below the
      minimum or without a breakpoint both counters stay 0, as the API does. `clock(received)` is the time the cache
      expires on (wall clock by default; a replay passes its virtual time, taken from the prompt).
    - Thinking: when the request asks for it (adaptive, or a budget), a log-normal number of thinking tokens by
      purpose and effort (`THINKING_MEDIAN`), capped by the budget, billed as output like the API does.
    - Answers: the screener signals on `pass_rate` of the calls; the position check wakes the analyst on
      `wake_rate` of its calls; the analyst, with no position open for the symbol,
      opens on `open_rate` of its calls (a long or short the risk gate accepts: stop 1.5% away, target 3%, 2% of
      equity, 2x) and otherwise holds; with a position it holds. Draws come from a random generator seeded by
      `seed` and the prompt, so a replay gets the same answers twice.
    - Latency per purpose (`latency`, e.g. REALISTIC_LATENCY, times `time_scale`); none by default.
    Every call is kept in `calls` (purpose, tokens, latency) for the benchmarks to compare with the ledger.
    """

    def __init__(self, *, pass_rate: float = 0.2, open_rate: float = 0.15, wake_rate: float = 0.25, seed: int = 20,
                 latency: dict[str, Latency] | None = None, time_scale: float = 1.0,
                 clock: Callable[[Received], float] | None = None) -> None:
        import time as _time

        self.pass_rate, self.open_rate, self.wake_rate, self.seed = pass_rate, open_rate, wake_rate, seed
        self.latency = latency or {}
        self.time_scale = time_scale
        self.clock = clock or (lambda _req: _time.monotonic())
        self.calls: list[ModelCall] = []
        self._cache: dict[str, float] = {}  # prefix hash -> expiry on the clock
        self._lock = threading.Lock()

    # -- counting ---------------------------------------------------------------------------------------------------
    @staticmethod
    def tokens(text: str, model: str) -> int:
        per_char = (1.3 if "haiku-5" in model else 1.0) / 3.6
        return int(math.ceil(len(text) * per_char)) if text else 0

    @staticmethod
    def _text(content: Any) -> str:
        if isinstance(content, str):
            return content
        return "".join(block.get("text", "") for block in content or [] if isinstance(block, dict))

    def _input(self, body: dict[str, Any], received: Received) -> tuple[int, int, int]:
        """(uncached input, cache write, cache read) tokens of a request."""
        model = body.get("model", "")
        system = body.get("system") or []
        if isinstance(system, str):
            system = [{"type": "text", "text": system}]
        messages = "".join(self._text(m.get("content")) for m in body.get("messages") or [])
        total = self.tokens("".join(b.get("text", "") for b in system) + messages, model)
        marked = max((i for i, b in enumerate(system) if b.get("cache_control")), default=-1)
        if marked < 0:
            return total, 0, 0
        prefix_text = "".join(b.get("text", "") for b in system[: marked + 1])
        prefix = self.tokens(prefix_text, model)
        if prefix < CACHE_MIN_TOKENS.get(model, 1024):
            return total, 0, 0
        key = hashlib.sha256(f"{model}\0{prefix_text}".encode()).hexdigest()
        now = self.clock(received)
        with self._lock:
            hit = self._cache.get(key, float("-inf")) > now  # expired at exactly 5 minutes
            self._cache[key] = now + CACHE_TTL_SECONDS
        return total - prefix, (0 if hit else prefix), (prefix if hit else 0)

    # -- answering --------------------------------------------------------------------------------------------------
    @staticmethod
    def purpose_of(body: dict[str, Any]) -> str:
        props = (((body.get("output_config") or {}).get("format") or {}).get("schema") or {}).get("properties") or {}
        if "signal" in props:
            return "screen"
        if "wake" in props:
            return "position_check"
        if "decision" in props:
            return "analyze"
        if "updated_playbook_json" in props:
            return "deep_reflection"
        if "execution_quality" in props:
            return "post_trade"
        return "other"

    def _answer(self, purpose: str, user: str, rng: random.Random) -> dict[str, Any]:
        if purpose == "screen":
            signal = rng.random() < self.pass_rate
            return {"signal": signal, "reason": "pullback to the 15m EMA20 in a 1H uptrend" if signal
                    else "no setup: price mid-range, momentum flat"}
        if purpose == "position_check":
            wake = rng.random() < self.wake_rate
            return {"wake": wake, "reason": "momentum turned against the position since the review" if wake
                    else "the position's plan holds: price between stop and target, nothing material changed"}
        if purpose == "analyze":
            symbol = (re.search(r"Decide now for (\S+)\.", user) or re.search(r"symbol (\S+)", user))
            symbol_id = symbol.group(1) if symbol else "BTC-USDT-SWAP"
            price_m = re.search(r"\nprice ([0-9.]+)|^price ([0-9.]+)", user, re.M)
            price = float(next(g for g in price_m.groups() if g)) if price_m else 0.0
            positions = re.search(r"<current_positions>(.*?)</current_positions>", user, re.S)
            holding = bool(positions) and symbol_id in positions.group(1)
            base = {"analysis": {"market_regime": "ranging", "bias": "neutral", "key_observations":
                                 ["price between the 1H EMA20 and EMA50", "funding neutral"], "risk_factors": []},
                    "confidence": 0.55, "strategy_used": "trend_pullback"}
            if holding or price <= 0 or rng.random() >= self.open_rate:
                return {**base, "decision": {"action": "HOLD", "symbol": symbol_id},
                        "reasoning": "no edge worth the risk now" if not holding else "the position's plan holds"}
            long = rng.random() < 0.5
            sl = price * (0.985 if long else 1.015)
            tp = price * (1.03 if long else 0.97)
            return {**base, "confidence": 0.68,
                    "decision": {"action": "OPEN_LONG" if long else "OPEN_SHORT", "symbol": symbol_id,
                                 "size_pct": 0.02, "order_type": "market", "entry_price": price,
                                 "limit_price": None, "stop_loss": round(sl, 1), "take_profit": round(tp, 1),
                                 "leverage": 2},
                    "reasoning": "trend pullback with room to the next level; stop beyond the swing"}
        if purpose == "post_trade":
            return {"outcome": "win" if rng.random() < 0.5 else "loss", "execution_quality": "acceptable",
                    "entry_timing": "good", "exit_timing": "good", "what_went_right": ["followed the plan"],
                    "what_went_wrong": [], "lesson": "keep stops beyond the swing", "should_update_playbook": False,
                    "playbook_suggestion": None}
        if purpose == "deep_reflection":
            current = re.search(r"<current_playbook[^>]*>\n(.*?)\n</current_playbook>", user, re.S)
            return {"updated_playbook_json": current.group(1) if current else "{}", "pattern_insights": [],
                    "bias_findings": [], "discipline_score": 70, "summary": "no change warranted", "changes": []}
        return {}

    def _thinking(self, body: dict[str, Any], purpose: str, rng: random.Random) -> int:
        thinking = body.get("thinking") or {}
        kind = thinking.get("type")
        if kind not in ("adaptive", "enabled"):
            return 0
        effort = (body.get("output_config") or {}).get("effort") or "medium"
        median = THINKING_MEDIAN.get((purpose, effort)) or THINKING_MEDIAN.get((purpose, "medium"), 500)
        n = int(_lognormal(rng, median, 0.5))
        if kind == "enabled":
            n = min(n, int(thinking.get("budget_tokens") or n))
        return max(1, n)

    def handle(self, received: Received) -> Reply:
        body = received.json()
        model = body.get("model", "")
        purpose = self.purpose_of(body)
        user = "".join(self._text(m.get("content")) for m in body.get("messages") or [])
        digest = hashlib.sha256(f"{self.seed}\0{user}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        answer = self._answer(purpose, user, rng)
        text = json.dumps(answer)
        thinking = self._thinking(body, purpose, rng)
        uncached, write, read = self._input(body, received)
        spec = self.latency.get(purpose)
        delay = spec.draw(rng, self.time_scale) if spec else 0.0
        out = self.tokens(text, model) + thinking
        call = ModelCall(purpose=purpose, model=model, input_tokens=uncached, output_tokens=out,
                         thinking_tokens=thinking, cache_write_tokens=write, cache_read_tokens=read,
                         latency_s=delay, answer=answer)
        with self._lock:
            self.calls.append(call)
        reply = ok(text, model=model, thinking="weighed the setup against the playbook" if thinking else None,
                   input_tokens=uncached, output_tokens=out, cache_creation_input_tokens=write,
                   cache_read_input_tokens=read)
        reply.delay = delay
        return reply

    def totals(self) -> dict[str, dict[str, int]]:
        """Per purpose: calls and tokens as this server billed them."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        with self._lock:
            for c in self.calls:
                row = out[c.purpose]
                row["calls"] += 1
                for name in ("input_tokens", "output_tokens", "thinking_tokens", "cache_write_tokens",
                             "cache_read_tokens"):
                    row[name] += getattr(c, name)
        return {k: dict(v) for k, v in out.items()}


__all__ = ["REALISTIC_LATENCY", "FakeAnthropic", "HonestModel", "Latency", "Received", "Reply", "error", "message_body",
           "ok", "overloaded", "proxy_page",
           "rate_limited", "raw_body"]
