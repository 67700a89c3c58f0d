"""Research with Perplexity (`sonar-pro` over httpx), only when triggered.

Triggers (DESIGN.md): a news window, a >3% 1H move, funding above 0.05% or
below -0.03%, open interest changing >10% in 4H. Answers are cached for an
hour per instrument and trigger set. The text is untrusted: it is parsed into
`ResearchResult` and only ever shown to a model inside a delimited section;
nothing in it reaches a setting or a rule.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
from django.conf import settings

from brain.budget import budget_check, llm_cost
from brain.llm import answer_validate, scrub
from brain.news import news_event_near
from brain.schemas import ResearchAnswer
from journal.models import LlmCall, LlmCallStatus
from market.schemas import MarketSnapshot
import structlog

log = structlog.get_logger(__name__)

RESEARCH_SYSTEM_PROMPT = """You are a crypto market research analyst.
Provide concise, factual analysis. Include:
1. Key facts & data points
2. Market sentiment assessment (bullish/bearish/neutral)
3. Potential impact on BTC/ETH price (high/medium/low)
4. Time horizon of impact (immediate/short/medium term)
5. Sources cited
Respond in structured JSON format with the keys: summary, sentiment, impact_level, time_horizon,
key_points, trading_implication, confidence (0-1), sources."""


def research_triggers(*, snapshot: MarketSnapshot, now: datetime) -> dict[str, str]:
    """Why research is warranted now, as {kind: description} (empty: it is not)."""
    reasons: dict[str, str] = {}
    event = news_event_near(now=now)
    if event is not None:
        reasons[f"news:{event.kind}:{event.scheduled_at:%Y%m%d%H%M}"] = (
            f"news window: {event.name} at {event.scheduled_at:%Y-%m-%d %H:%M} UTC"
        )
    move = snapshot.price_change_1h_pct
    if snapshot.anomalies.move_1h or (move is not None and abs(move) > float(settings.ANOMALY_MOVE_1H_PCT)):
        reasons["move_1h"] = f"1H move {move * 100:+.2f}%" if move is not None else "1H move anomaly"
    funding = snapshot.funding_rate
    if snapshot.anomalies.funding_spike or (
        funding is not None and (funding > settings.FUNDING_SPIKE_HIGH or funding < settings.FUNDING_SPIKE_LOW)
    ):
        reasons["funding"] = f"funding rate {funding}"
    oi = snapshot.oi_change_4h_pct
    if snapshot.anomalies.oi_change_4h or (oi is not None and abs(oi) > float(settings.OI_CHANGE_4H_PCT)):
        reasons["oi_4h"] = f"OI change 4H {oi * 100:+.1f}%" if oi is not None else "OI change anomaly"
    return reasons


def trigger_key(inst_id: str, kinds: list[str]) -> str:
    # The kinds of trigger, not their numbers: a 3.1% and a 3.4% move share a cache entry.
    return f"{inst_id}|{','.join(sorted(kinds))}"[:200]


class ResearchUnavailable(Exception):
    pass


def perplexity_ask(*, query: str, cycle_id: int | None = None, mode: str = "live", now: datetime | None = None,
                   transport: httpx.BaseTransport | None = None) -> tuple[ResearchAnswer | None, str, list[str]]:
    """One Perplexity call, journaled as an LlmCall. Returns (answer or None, reason, citations)."""
    if not settings.PERPLEXITY_API_KEY:
        raise ResearchUnavailable("PERPLEXITY_API_KEY is not set")
    state = budget_check(now=now or datetime.now(timezone.utc))
    if state.degraded:
        raise ResearchUnavailable(f"LLM budget exhausted (${state.spent} of ${state.budget})")
    model = settings.PERPLEXITY_MODEL
    body = {
        "model": model,
        "messages": [{"role": "system", "content": RESEARCH_SYSTEM_PROMPT}, {"role": "user", "content": query}],
        "temperature": 0.2,
        "max_tokens": 800,
        "response_format": {"type": "json_schema", "json_schema": {"schema": ResearchAnswer.model_json_schema()}},
    }
    row = LlmCall.objects.create(cycle_id=cycle_id, mode=mode, purpose="research", provider="perplexity", model=model, prompt=body)
    t0 = time.monotonic()
    status, error, raw, citations = LlmCallStatus.ERROR, "", "", []
    usage_in = usage_out = 0
    answer: ResearchAnswer | None = None
    try:
        with httpx.Client(base_url=settings.PERPLEXITY_BASE_URL, timeout=settings.PERPLEXITY_TIMEOUT_SECONDS, transport=transport) as http:
            response = http.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {settings.PERPLEXITY_API_KEY}"})
        if response.status_code != 200:
            error = f"HTTP {response.status_code}: {response.text[:300]}"
        else:
            payload = response.json()
            usage = payload.get("usage") or {}
            usage_in, usage_out = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            citations = [str(c) for c in payload.get("citations") or []][:10]
            raw = payload["choices"][0]["message"]["content"] or ""
            answer = answer_validate(raw, ResearchAnswer)
            status = LlmCallStatus.OK
    except httpx.TimeoutException:
        status, error = LlmCallStatus.TIMEOUT, f"timed out after {settings.PERPLEXITY_TIMEOUT_SECONDS}s"
    except httpx.HTTPError as exc:
        error = f"connection error: {exc}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        status, error = LlmCallStatus.INVALID, f"unusable answer: {exc}"
    cost = llm_cost(model=model, input_tokens=usage_in, output_tokens=usage_out) if usage_in or usage_out else Decimal(0)
    row.status, row.parse_error, row.raw_answer = status, scrub(error)[:4000], scrub(raw)
    row.parsed = answer is not None
    row.input_tokens, row.output_tokens, row.cost_usd = usage_in, usage_out, cost
    row.latency_ms = int((time.monotonic() - t0) * 1000)
    row.completed_at = datetime.now(timezone.utc)
    row.save()
    return answer, scrub(error), citations


def cache_lookup(*, key: str, now: datetime):
    from brain.models import ResearchCache

    ttl = settings.RESEARCH_CACHE_SECONDS
    return ResearchCache.objects.filter(key=key, created_at__gt=now - timedelta(seconds=ttl)).order_by("-created_at").first()


def cache_store(*, key: str, query: str, answer: ResearchAnswer, now: datetime) -> None:
    from brain.models import ResearchCache

    ResearchCache.objects.create(key=key, query=query, response_json=json.loads(answer.model_dump_json()),
                                 ttl_seconds=settings.RESEARCH_CACHE_SECONDS, created_at=now)
