"""The LLM gateway: one structured call to Claude, validated, journaled, priced.

- Structured outputs: the request carries `output_config.format` (a JSON
  schema built from the pydantic model with the SDK's own `transform_schema`,
  exactly what `messages.parse` sends). We call `messages.create` and validate
  ourselves instead of `messages.parse`, because `parse` raises inside the SDK
  on an invalid answer and loses the raw text and the usage we must record.
  No forced tool call (the 5.5 models answer HTTP 400) and no prefill.
- Per-model capabilities: temperature only where accepted (the SDK 2.11 has no
  `temperature` argument, so it travels in `extra_body`); adaptive thinking and
  `effort` on the 5.5 models; thinking blocks are skipped when reading.
- Prompt caching: the static system blocks end with `cache_control` only when
  they reach the model's minimum cacheable length (`ModelCaps.cache_min_tokens`):
  below it the API caches nothing and says nothing (both counters 0), so a
  breakpoint there only misleads. With `cache_when="read_plausible"` (the
  analyst) also only when a read is plausible (`cache_read_plausible`): a write
  costs 1.25x the input price and is worth it only if another call of the
  prefix comes within the cache's 5 minutes. Cache writes and reads are
  recorded per call from the API's usage.
- Extended thinking with a token budget on the 4.x models when a purpose's
  `thinking_budget` setting is above 0 (the 5.5 models think adaptively;
  `effort` is their control).
- Retries: 429 (honouring retry-after), 529, 5xx and connection errors are
  retried with backoff inside one deadline; a timeout ends the call.
- A 200 whose body is not a Messages response (a proxy's HTML page, broken or
  foreign JSON) is an error like a connection error, retried the same way: the
  SDK would hand it back as a str, a half-built Message, or raise a JSON error.
- One stricter retry when the answer does not validate; then the caller's
  safe default.
- Every attempt is an `LlmCall` row written before the request and completed
  after it (never inside a transaction across the call).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Generic, TypeVar

import anthropic
import structlog
from anthropic.lib._parse._transform import transform_schema
from django.conf import settings
from pydantic import BaseModel, ValidationError

from brain.budget import budget_check, llm_cost
from journal.models import Cycle, LlmCall, LlmCallStatus, Mode
from redaction import redact

log = structlog.get_logger(__name__)
T = TypeVar("T", bound=BaseModel)

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
MAX_BACKOFF_SECONDS = 8.0


@dataclass(frozen=True)
class ModelCaps:
    temperature: bool  # the model accepts `temperature`
    adaptive_thinking: bool  # send thinking={"type": "adaptive"}
    effort: bool  # send output_config.effort
    # The shortest prefix the API caches (tokens, the model's own count). Checked (Dec 2026) against Anthropic's
    # prompt-caching page as quoted in anthropic-sdk-python issue #1194 and gateway docs that copy its table:
    # 4,096 for Opus 4.6, Opus 4.5 and Haiku 4.5; 1,024 for Sonnet 4.5 and Opus 4.1/4; Sonnet 4.6 is 1,024 on
    # that page but 2,048 in other copies and in that measurements, so 2,048 here. A summary of the
    # current page gives 512 for the Opus 5 family and 1,024 for Sonnet 5. No figure was found for Opus 5.5,
    # Sonnet 5.5 or Haiku 5.5: Opus 5's 512 and Sonnet 5's 1,024 are assumed (cache_worth_marking keeps a margin).
    cache_min_tokens: int = 4096
    # Tokens per character of English/JSON prompt text, for the estimate below (Haiku 5.5's tokenizer
    # counts ~30% more tokens for the same text than the 4.x ones).
    tokens_per_char: float = 1 / 3.6


# Known models; anything else is matched by family below.
CAPABILITIES: dict[str, ModelCaps] = {
    "claude-opus-4-6": ModelCaps(temperature=True, adaptive_thinking=False, effort=False, cache_min_tokens=4096),
    "claude-opus-4-5-20251101": ModelCaps(temperature=True, adaptive_thinking=False, effort=False, cache_min_tokens=4096),
    "claude-haiku-4-5-20251001": ModelCaps(temperature=True, adaptive_thinking=False, effort=False, cache_min_tokens=4096),
    "claude-sonnet-4-6": ModelCaps(temperature=True, adaptive_thinking=False, effort=False, cache_min_tokens=2048),
    "claude-sonnet-4-5-20250929": ModelCaps(temperature=True, adaptive_thinking=False, effort=False, cache_min_tokens=1024),
    "claude-opus-5-5": ModelCaps(temperature=False, adaptive_thinking=True, effort=True, cache_min_tokens=512),
    "claude-sonnet-5-5": ModelCaps(temperature=False, adaptive_thinking=True, effort=True, cache_min_tokens=1024),
    "claude-haiku-5-5": ModelCaps(temperature=False, adaptive_thinking=True, effort=True, cache_min_tokens=1024,
                                  tokens_per_char=1.3 / 3.6),
}


def model_caps(model: str) -> ModelCaps:
    if model in CAPABILITIES:
        return CAPABILITIES[model]
    match = re.search(r"-(\d+)-(\d+)", model)
    if match and (int(match.group(1)), int(match.group(2))) >= (5, 0):
        return ModelCaps(temperature=False, adaptive_thinking=True, effort=True,
                         cache_min_tokens=512 if "opus" in model else 1024)
    # An unknown older model: sending no temperature is always accepted; the largest known minimum.
    return ModelCaps(temperature=False, adaptive_thinking=False, effort=False, cache_min_tokens=4096)


def prefix_tokens_estimate(blocks: list[str], model: str) -> int:
    """The static prefix's length in the model's tokens, estimated from its characters."""
    return int(sum(len(b) for b in blocks) * model_caps(model).tokens_per_char)


def cache_worth_marking(blocks: list[str], model: str) -> bool:
    """Whether the static prefix reaches the model's minimum cacheable length.

    Below the minimum the API neither writes nor reads a cache entry; the
    breakpoint is left out so the request says what will happen. The estimate
    leaves a 10% margin: a prefix just under the minimum by our count may still
    reach it by the model's, and a breakpoint on one that falls short costs nothing.
    """
    return bool(blocks) and prefix_tokens_estimate(blocks, model) >= 0.9 * model_caps(model).cache_min_tokens


CACHE_TTL_SECONDS = 300  # the API's default (ephemeral) cache: 5 minutes, refreshed by each read


def cache_read_plausible(*, purpose: str, model: str, now: datetime, run_id: str = "", cycle_id: int | None = None) -> bool:
    """Whether another call of this purpose's prefix is expected within the cache's TTL.

    Judged from the ledger: a call of the same purpose and model in the last TTL means the calls are that dense
    now (several instruments on one tick, a short cycle interval), so the next one will likely read what this one
    writes. One instrument whose analyst calls are an hour apart finds none, and writes nothing it would never
    read. Live, on the wall clock over every call (the API's cache is shared by any caller of the same prefix);
    a replay (`run_id`), on its cycles' virtual times. A call exactly one TTL earlier does not count: its entry
    has expired by then.
    """
    since = now - timedelta(seconds=CACHE_TTL_SECONDS)
    calls = LlmCall.objects.filter(purpose=purpose, model=model)
    if run_id:
        calls = calls.filter(cycle__run_id=run_id, cycle__as_of__gt=since, cycle__as_of__lte=now)
    else:
        calls = calls.filter(created_at__gt=since, created_at__lte=now)
    if cycle_id is not None:
        calls = calls.exclude(cycle_id=cycle_id)
    return calls.exists()


@dataclass(frozen=True)
class CallSpec:
    purpose: str  # screen, analyze, post_trade, deep_reflection
    model: str
    max_tokens: int
    timeout: float  # seconds for the whole call, retries included
    temperature: float | None = None
    effort: str | None = None
    thinking_budget: int = 0  # extended thinking tokens on a 4.x model (0 = off); the 5.5 models think adaptively


@dataclass
class LlmResult(Generic[T]):
    value: T | None
    status: str  # ok, invalid, timeout, error, skipped
    reason: str = ""
    call_ids: list[int] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: Decimal = Decimal("0")
    latency_ms: int = 0
    model: str = ""

    @property
    def ok(self) -> bool:
        return self.value is not None

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_write_tokens + self.cache_read_tokens


class LlmUnavailable(Exception):
    """No key, or degrade mode: the call was not sent."""


class NotAMessage(Exception):
    """The API (or something in front of it) answered 2xx with a body that is not a Messages response."""


def anthropic_client() -> anthropic.Anthropic:
    if not settings.ANTHROPIC_API_KEY:
        raise LlmUnavailable("ANTHROPIC_API_KEY is not set")
    kwargs: dict[str, Any] = {"api_key": settings.ANTHROPIC_API_KEY, "max_retries": 0}
    if settings.ANTHROPIC_BASE_URL:
        kwargs["base_url"] = settings.ANTHROPIC_BASE_URL
    return anthropic.Anthropic(**kwargs)


def output_schema(model_type: type[BaseModel]) -> dict[str, Any]:
    return {"type": "json_schema", "schema": transform_schema(model_type)}


def scrub(text: str) -> str:
    """`redact` plus the keys as settings hold them (they may not come from os.environ)."""
    text = redact(text)
    for secret in (settings.ANTHROPIC_API_KEY, settings.PERPLEXITY_API_KEY):
        if secret and len(secret) >= 6:
            text = text.replace(secret, "[REDACTED]")
    return text


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json_text(text: str) -> str:
    """The JSON object in an answer: bare, in a markdown fence, or inside prose."""
    stripped = text.strip()
    if stripped.startswith("{"):
        return stripped
    fence = _FENCE.search(stripped)
    if fence:
        return fence.group(1).strip()
    start, end = stripped.find("{"), stripped.rfind("}")
    if start != -1 and end > start:
        return stripped[start : end + 1]
    return stripped


def answer_validate(text: str, model_type: type[T]) -> T:
    """Validate an answer's JSON against the model; ValueError says what is wrong."""
    if not text.strip():
        raise ValueError("empty answer")
    candidate = extract_json_text(text)
    try:
        data = json.loads(candidate)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    try:
        return model_type.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:8])
        raise ValueError(f"schema: {problems}") from None


NOT_A_MESSAGE = "the API answered with something that is not a Messages response"
_TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _message_problem(message: Any) -> str:
    """What keeps a parsed body from being a Message we can read ("" when nothing does).

    Without strict validation the SDK does not check the shape: a text/html page comes back as a str,
    foreign JSON as a Message whose fields are all None, a block without text as a TextBlock(text=None).
    Only what this module reads is checked, so a new block type or field from the API still passes.
    """
    if not isinstance(message, anthropic.types.Message):
        return f"the SDK read it as a {type(message).__name__}"
    if message.type != "message":
        return f"its type is {message.type!r}, not 'message'"
    usage = message.usage
    if not isinstance(usage, anthropic.types.Usage):
        return "it has no usage"
    if any(not isinstance(getattr(usage, name, None), (int, type(None))) for name in _TOKEN_FIELDS):
        return "its usage is not token counts"
    if not isinstance(message.content, list):
        return "its content is not a list of blocks"
    for block in message.content:
        kind = getattr(block, "type", None)
        if not isinstance(kind, str) or (kind == "text" and not isinstance(getattr(block, "text", None), str)):
            return "its content holds a block that is not a content block"
    return ""


def _message_read(raw: Any) -> anthropic.types.Message:
    """The Message in a raw 2xx answer; NotAMessage (scrubbed) says what came instead."""
    try:
        message = raw.parse()
    except Exception as exc:  # noqa: BLE001 - JSONDecodeError, APIResponseValidationError on a strict client, ...
        problem = f"the SDK could not read it ({type(exc).__name__}: {exc})"
    else:
        problem = _message_problem(message)
    if not problem:
        return message
    try:
        body = raw.http_response.text
    except Exception:  # noqa: BLE001 - an undecodable body: the problem above already says enough
        body = ""
    content_type = raw.headers.get("content-type") or "no content-type"
    raise NotAMessage(scrub(f"{NOT_A_MESSAGE}: HTTP {raw.status_code} {content_type}, {problem}; body {body[:200]!r}"))


def _answer_text(message: Any) -> str:
    # Thinking / redacted_thinking blocks come first on thinking models: skip them.
    return "".join(block.text for block in message.content if getattr(block, "type", "") == "text")


def _retry_wait(exc: anthropic.APIStatusError | None, attempt: int) -> float:
    if exc is not None:
        header = exc.response.headers.get("retry-after")
        if header:
            try:
                return max(0.0, float(header))
            except ValueError:
                pass
    return min(MAX_BACKOFF_SECONDS, 0.25 * (2**attempt))


STRICT_NOTE = (
    "Your previous answer could not be used: {error}. Answer again with ONLY one JSON object that matches "
    "the required schema exactly: no prose, no markdown, every required field present with the right type."
)


def llm_call_structured(
    *,
    spec: CallSpec,
    system_static: list[str],
    user: str,
    output_type: type[T],
    cycle_id: int | None = None,
    mode: str = "live",
    now: datetime | None = None,
    client: anthropic.Anthropic | None = None,
    cache_when: str = "long_enough",
) -> LlmResult[T]:
    """Ask for `output_type`; never raises for model or network trouble.

    `system_static` are the cacheable blocks (system prompt, output format,
    playbook): the last one carries `cache_control` when they reach the model's
    minimum and, with `cache_when="read_plausible"`, when `cache_read_plausible`
    too. `user` is the part that changes every cycle.
    """
    result: LlmResult[T] = LlmResult(value=None, status="error", model=spec.model)
    budget_clock = _budget_clock(mode=mode, cycle_id=cycle_id, now=now)
    state = budget_check(**budget_clock)
    if state.degraded:
        result.status, result.reason = "skipped", f"LLM budget exhausted (${state.spent} of ${state.budget}): degrade mode"
        return result
    try:
        client = client or anthropic_client()
    except LlmUnavailable as exc:
        result.status, result.reason = "skipped", str(exc)
        return result

    caps = model_caps(spec.model)
    system = [{"type": "text", "text": block} for block in system_static]
    if system and cache_worth_marking(system_static, spec.model) and (
            cache_when != "read_plausible" or cache_read_plausible(
                purpose=spec.purpose, model=spec.model, now=budget_clock["now"], run_id=budget_clock.get("run_id", ""),
                cycle_id=cycle_id)):
        system[-1]["cache_control"] = {"type": "ephemeral"}
    output_config: dict[str, Any] = {"format": output_schema(output_type)}
    if caps.effort and spec.effort:
        output_config["effort"] = spec.effort
    extra_body: dict[str, Any] = {}
    thinking: dict[str, Any] | None = None
    if caps.adaptive_thinking:
        thinking = {"type": "adaptive"}
    elif spec.thinking_budget > 0:
        # Extended thinking: temperature must then be left at its default (the API refuses another).
        thinking = {"type": "enabled", "budget_tokens": spec.thinking_budget}
    if caps.temperature and spec.temperature is not None and thinking is None:
        extra_body["temperature"] = spec.temperature

    messages = [{"role": "user", "content": user}]
    deadline = time.monotonic() + spec.timeout
    started = time.monotonic()
    attempt, strict_retry_used = 0, False
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0.05:
            result.status, result.reason = "timeout", f"no time left after {attempt - 1} attempt(s) ({spec.timeout:.0f}s limit)"
            break
        request = {"model": spec.model, "max_tokens": spec.max_tokens, "system": system, "messages": messages,
                   "output_config": output_config, **extra_body}
        if thinking:
            request["thinking"] = thinking
        row = LlmCall.objects.create(
            cycle_id=cycle_id, mode=mode, purpose=spec.purpose, provider="anthropic", model=spec.model,
            attempt=attempt, prompt=json.loads(scrub(json.dumps(request))),
        )
        result.call_ids.append(row.pk)
        t0 = time.monotonic()
        kwargs: dict[str, Any] = dict(model=spec.model, max_tokens=spec.max_tokens, system=system, messages=messages,
                                      output_config=output_config, timeout=remaining)
        if extra_body:
            kwargs["extra_body"] = extra_body
        if thinking:
            kwargs["thinking"] = thinking
        try:
            # The raw response, parsed by `_message_read`: a 2xx body that is not a Message is caught here too.
            message = _message_read(client.messages.with_raw_response.create(**kwargs))
        except anthropic.APITimeoutError:
            _complete(row, status=LlmCallStatus.TIMEOUT, error=f"timed out after {remaining:.1f}s", t0=t0)
            result.status, result.reason = "timeout", f"{spec.purpose} timed out ({spec.timeout:.0f}s limit)"
            break
        except anthropic.APIStatusError as exc:
            error = scrub(f"HTTP {exc.status_code} {exc.type or ''}: {exc.api_message or exc}")
            _complete(row, status=LlmCallStatus.ERROR, error=error, t0=t0)
            if exc.status_code in RETRYABLE_STATUS:
                wait = _retry_wait(exc, attempt)
                if time.monotonic() + wait < deadline - 0.5:
                    log.warning("llm_retry", purpose=spec.purpose, status=exc.status_code, wait_s=wait, attempt=attempt)
                    time.sleep(wait)
                    continue
                error += f"; retry would need {wait:.1f}s, past the {spec.timeout:.0f}s limit"
            result.status, result.reason = "error", error
            break
        except anthropic.APIConnectionError as exc:
            error = scrub(f"connection error: {exc}")
            _complete(row, status=LlmCallStatus.ERROR, error=error, t0=t0)
            wait = _retry_wait(None, attempt)
            if time.monotonic() + wait < deadline - 0.5:
                time.sleep(wait)
                continue
            result.status, result.reason = "error", error
            break
        except (NotAMessage, anthropic.APIResponseValidationError) as exc:
            # Usually a proxy or load balancer between us and the API having a moment (its own error or
            # maintenance page, a cut body): retried like a connection error, within the same deadline.
            # A base URL that always answers so ends at the deadline, each attempt an ERROR row.
            error = str(exc) if isinstance(exc, NotAMessage) else scrub(f"{NOT_A_MESSAGE}: {exc}")
            _complete(row, status=LlmCallStatus.ERROR, error=error, t0=t0)
            wait = _retry_wait(None, attempt)
            if time.monotonic() + wait < deadline - 0.5:
                log.warning("llm_retry", purpose=spec.purpose, status="not_a_message", wait_s=wait, attempt=attempt)
                time.sleep(wait)
                continue
            result.status, result.reason = "error", error
            break

        usage = message.usage
        tokens = {
            "input_tokens": usage.input_tokens or 0,
            "output_tokens": usage.output_tokens or 0,  # thinking included by the API
            "cache_write_tokens": usage.cache_creation_input_tokens or 0,
            "cache_read_tokens": usage.cache_read_input_tokens or 0,
        }
        cost = llm_cost(model=spec.model, **tokens)
        for key, value in tokens.items():
            setattr(result, key, getattr(result, key) + value)
        result.cost_usd += cost
        text = _answer_text(message)
        try:
            if message.stop_reason == "max_tokens" and not text.strip().endswith("}"):
                raise ValueError(f"answer cut off at max_tokens ({usage.output_tokens} output tokens)")
            if message.stop_reason == "refusal":
                raise ValueError("the model refused to answer")
            value = answer_validate(text, output_type)
        except ValueError as exc:
            _complete(row, status=LlmCallStatus.INVALID, error=str(exc), t0=t0, raw=text, cost=cost, **tokens)
            if not strict_retry_used:
                strict_retry_used = True
                messages = [{"role": "user", "content": user + "\n\n" + STRICT_NOTE.format(error=str(exc)[:300])}]
                continue
            result.status, result.reason = "invalid", f"invalid answer twice: {exc}"
            break
        _complete(row, status=LlmCallStatus.OK, error="", t0=t0, raw=text, cost=cost, parsed=True, **tokens)
        result.value, result.status, result.reason = value, "ok", ""
        break
    result.latency_ms = int((time.monotonic() - started) * 1000)
    if result.status != "ok":
        log.warning("llm_call_failed", purpose=spec.purpose, model=spec.model, status=result.status, reason=result.reason)
    budget_check(**budget_clock)  # the 80% warning / degrade note right away
    return result


def _budget_clock(*, mode: str, cycle_id: int | None, now: datetime | None) -> dict[str, Any]:
    """The budget day a call counts in: the wall clock live; a replay's own virtual day (its cycle's time)."""
    if mode == Mode.REPLAY and cycle_id is not None:
        row = Cycle.objects.filter(pk=cycle_id).values_list("as_of", "run_id").first()
        if row is not None:
            return {"now": row[0], "mode": Mode.REPLAY, "run_id": row[1]}
    return {"now": now or datetime.now(timezone.utc)}


def _complete(row: LlmCall, *, status: str, error: str, t0: float, raw: str = "", cost: Decimal = Decimal("0"),
              parsed: bool = False, input_tokens: int = 0, output_tokens: int = 0,
              cache_write_tokens: int = 0, cache_read_tokens: int = 0) -> None:
    row.status = status
    row.parse_error = scrub(error)[:4000]
    row.raw_answer = scrub(raw)
    row.parsed = parsed
    row.input_tokens, row.output_tokens = input_tokens, output_tokens
    row.cache_write_tokens, row.cache_read_tokens = cache_write_tokens, cache_read_tokens
    row.cost_usd = cost
    row.latency_ms = int((time.monotonic() - t0) * 1000)
    row.completed_at = datetime.now(timezone.utc)
    row.save()
