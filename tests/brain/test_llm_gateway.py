"""The Claude path through the real anthropic SDK against a local Messages API server."""
from __future__ import annotations

import json
import time
from decimal import Decimal

from django.db.models import F

import pytest

from brain.claude import ClaudeBrain
from brain.llm import CallSpec, LlmResult, llm_call_structured
from brain.schemas import Action, ScreenResult
from brain.services import decision_make
from journal.models import LlmCall
from tests.brain import factories as f
from tests.fakes.anthropic_server import Reply, error, message_body, ok, overloaded, proxy_page, rate_limited, raw_body

pytestmark = pytest.mark.django_db

GOOD = {
    "analysis": {"market_regime": "trending_up", "bias": "bullish", "key_observations": ["pullback to EMA20"], "risk_factors": []},
    "decision": {"action": "OPEN_LONG", "symbol": "BTC-USDT-SWAP", "size_pct": 0.03, "order_type": "market",
                 "entry_price": 70000, "limit_price": None, "stop_loss": 69300, "take_profit": 71400, "leverage": 2},
    "confidence": 0.7, "strategy_used": "trend_pullback", "reasoning": "trend pullback",
}


def decide(**kwargs):
    return decision_make(snapshot=f.pullback_long(), context=f.context(), **kwargs)


def test_it_parses_a_valid_answer_into_a_decision_and_journals_the_call(anthropic_server):
    anthropic_server.script(ok(data=GOOD, input_tokens=1200, output_tokens=300))
    decision = decide()
    assert decision.action == Action.OPEN_LONG and decision.decision.stop_loss == 69300
    row = LlmCall.objects.get()
    assert (row.status, row.parsed, row.purpose, row.provider, row.model) == ("ok", True, "analyze", "anthropic", "claude-opus-4-6")
    assert row.input_tokens == 1200 and row.output_tokens == 300 and row.completed_at is not None
    assert "market_snapshot" in json.dumps(row.prompt) and json.loads(row.raw_answer)["confidence"] == 0.7


def test_it_skips_thinking_blocks_when_reading_the_answer(anthropic_server):
    anthropic_server.script(ok(data=GOOD, thinking='{"decision": "this is not the answer"}'))
    assert decide().action == Action.OPEN_LONG


@pytest.mark.parametrize("text", [
    "Here is my decision:\n" + json.dumps(GOOD) + "\nGood luck.",
    "```json\n" + json.dumps(GOOD) + "\n```",
])
def test_it_reads_json_wrapped_in_prose_or_a_markdown_fence(anthropic_server, text):
    anthropic_server.script(ok(text))
    assert decide().action == Action.OPEN_LONG
    assert LlmCall.objects.count() == 1


def test_missing_fields_get_one_stricter_retry(anthropic_server):
    anthropic_server.script(ok(data={"analysis": {}, "confidence": 0.5}), ok(data=GOOD))
    assert decide().action == Action.OPEN_LONG
    first, second = anthropic_server.bodies()
    assert "could not be used" in second["messages"][0]["content"] and "decision" in second["messages"][0]["content"]
    assert list(LlmCall.objects.order_by("id").values_list("status", "attempt")) == [("invalid", 1), ("ok", 2)]


@pytest.mark.parametrize("reply", [
    ok(data={**GOOD, "confidence": "very high", "decision": {**GOOD["decision"], "leverage": "lots"}}),  # wrong types
    ok(""),  # empty answer
    ok("{", output_tokens=1, stop_reason="max_tokens"),  # one output token
    ok("I cannot decide right now."),  # prose, no JSON
])
def test_an_invalid_answer_twice_ends_in_a_recorded_hold(anthropic_server, reply):
    anthropic_server.script(reply)
    decision = decide()
    assert decision.action == Action.HOLD and "invalid answer twice" in decision.reasoning
    rows = list(LlmCall.objects.order_by("id"))
    assert [r.status for r in rows] == ["invalid", "invalid"] and all(r.parse_error for r in rows)


def test_a_timeout_is_a_hold_within_the_time_limit(anthropic_server, settings):
    settings.ANALYST_TIMEOUT_SECONDS = 1.0
    anthropic_server.route("POST", "/v1/messages", _delayed(ok(data=GOOD), 3.0))
    started = time.monotonic()
    decision = decide()
    assert time.monotonic() - started < 2.5
    assert decision.action == Action.HOLD and "timed out" in decision.reasoning
    assert LlmCall.objects.get().status == "timeout"


def _delayed(reply, seconds):
    reply.delay = seconds
    return reply


def test_a_529_overloaded_is_retried_and_then_answered(anthropic_server):
    anthropic_server.script(overloaded(), ok(data=GOOD))
    assert decide().action == Action.OPEN_LONG
    assert list(LlmCall.objects.order_by("id").values_list("status", flat=True)) == ["error", "ok"]
    assert "529 overloaded_error" in LlmCall.objects.order_by("id").first().parse_error


def test_a_429_waits_the_retry_after_then_retries(anthropic_server):
    anthropic_server.script(rate_limited("1"), ok(data=GOOD))
    started = time.monotonic()
    assert decide().action == Action.OPEN_LONG
    assert time.monotonic() - started >= 1.0


def test_a_429_whose_retry_after_exceeds_the_limit_is_a_hold_at_once(anthropic_server):
    anthropic_server.script(rate_limited("120"))
    started = time.monotonic()
    decision = decide()
    assert time.monotonic() - started < 2.0
    assert decision.action == Action.HOLD and "429" in decision.reasoning


def test_persistent_5xx_is_a_hold_and_a_400_is_not_retried(anthropic_server, settings):
    settings.ANALYST_TIMEOUT_SECONDS = 2.0
    anthropic_server.script(error(500, "api_error"))
    assert decide().action == Action.HOLD
    LlmCall.objects.all().delete()
    anthropic_server.script(error(400, "invalid_request_error", "tool_choice is not supported"))
    decision = decide()
    assert decision.action == Action.HOLD and "400" in decision.reasoning
    assert LlmCall.objects.count() == 1


def test_cost_equals_hand_computed_prices_with_cache_writes_and_reads(anthropic_server):
    anthropic_server.script(ok(data=GOOD, input_tokens=1000, output_tokens=500, cache_creation_input_tokens=2000, cache_read_input_tokens=3000))
    decide()
    row = LlmCall.objects.get()
    # Opus 4.6: $5 in, $25 out, $6.25 cache write, $0.50 cache read per million.
    assert row.cost_usd == Decimal("0.0315")
    assert (row.cache_write_tokens, row.cache_read_tokens) == (2000, 3000)


def test_thinking_tokens_are_billed_as_output_on_a_5_5_model(anthropic_server, settings):
    settings.ANALYST_MODEL = "claude-opus-5-5"
    # output_tokens from the API already includes the thinking tokens.
    anthropic_server.script(ok(data=GOOD, thinking="weighing the pullback", model="claude-opus-5-5",
                               input_tokens=400, output_tokens=1800, cache_read_input_tokens=2500))
    assert decide().action == Action.OPEN_LONG
    row = LlmCall.objects.get()
    assert row.output_tokens == 1800
    assert row.cost_usd == (Decimal(400) * 4 + Decimal(1800) * 20 + Decimal(2500) * Decimal("0.20")) / Decimal(1_000_000)


def test_the_static_prefix_is_cached_and_holds_the_playbook_on_a_model_whose_minimum_it_reaches(anthropic_server, settings):
    # Opus 5.5 caches prefixes of 512 tokens and more; the analyst's static part is ~2,000. The first call has no
    # other within the cache's 5 minutes (no read plausible): unmarked; the second, right after it, is marked.
    settings.ANALYST_MODEL = "claude-opus-5-5"
    anthropic_server.script(ok(data=GOOD, model="claude-opus-5-5"), ok(data=GOOD, model="claude-opus-5-5"))
    decide()
    decide()
    first, body = anthropic_server.bodies()
    assert all("cache_control" not in block for block in first["system"])
    system = body["system"]
    assert system[-1]["cache_control"] == {"type": "ephemeral"}
    assert "<playbook" in system[-1]["text"] and "<output_format>" in system[1]["text"]
    assert "<playbook" not in body["messages"][0]["content"]
    assert all("cache_control" not in block for block in system[:-1])


def test_a_prefix_below_the_models_minimum_is_sent_without_cache_control(anthropic_server, settings):
    # Opus 4.6 and Haiku 4.5 cache only prefixes of 4,096 tokens and more: the analyst's static part
    # (~2,000) and the screener's (~250) are below it, so neither carries a breakpoint.
    from brain.llm import cache_worth_marking, prefix_tokens_estimate
    from brain.prompts import SCREENER_SYSTEM_PROMPT

    anthropic_server.script(ok(data=GOOD), ok(data={"signal": True, "reason": "pullback"}))
    decide()
    ClaudeBrain().screen(snapshot=f.pullback_long(), context=f.context())
    analyst, screener = anthropic_server.bodies()
    assert analyst["model"] == "claude-opus-4-6" and screener["model"] == "claude-haiku-4-5-20251001"
    for body in (analyst, screener):
        assert all("cache_control" not in block for block in body["system"]), body["system"]
    static = [block["text"] for block in analyst["system"]]
    assert 1000 < prefix_tokens_estimate(static, "claude-opus-4-6") < 4096
    assert not cache_worth_marking([SCREENER_SYSTEM_PROMPT], "claude-haiku-5-5")
    assert cache_worth_marking(static, "claude-opus-5-5") and not cache_worth_marking(static, "claude-haiku-4-5-20251001")


def test_cache_usage_in_the_ledger_equals_what_the_server_reported(anthropic_server, settings):
    settings.ANALYST_MODEL = "claude-opus-5-5"
    anthropic_server.script(
        ok(data=GOOD, model="claude-opus-5-5", input_tokens=700, output_tokens=900, cache_creation_input_tokens=2100),
        ok(data=GOOD, model="claude-opus-5-5", input_tokens=710, output_tokens=850, cache_read_input_tokens=2100),
    )
    decide()
    decide()
    first, second = LlmCall.objects.order_by("id")
    assert (first.input_tokens, first.output_tokens, first.cache_write_tokens, first.cache_read_tokens) == (700, 900, 2100, 0)
    assert (second.input_tokens, second.output_tokens, second.cache_write_tokens, second.cache_read_tokens) == (710, 850, 0, 2100)
    assert second.cost_usd == (Decimal(710) * 4 + Decimal(850) * 20 + Decimal(2100) * Decimal("0.20")) / Decimal(1_000_000)


def test_extended_thinking_with_a_budget_on_a_4_6_model_drops_temperature(anthropic_server, settings):
    settings.ANALYST_THINKING_BUDGET = 2000
    anthropic_server.script(ok(data=GOOD, thinking="let me weigh it"))
    assert decide().action == Action.OPEN_LONG
    body = anthropic_server.bodies()[0]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    assert body["max_tokens"] > 2000 and "temperature" not in body


def test_a_4_6_config_sends_temperature_and_no_thinking(anthropic_server):
    anthropic_server.script(ok(data=GOOD))
    decide()
    body = anthropic_server.bodies()[0]
    assert body["temperature"] == 0.2 and "thinking" not in body
    assert body["output_config"]["format"]["type"] == "json_schema" and "effort" not in body["output_config"]


def test_a_5_5_config_sends_no_temperature_and_no_forced_tool(anthropic_server, settings):
    settings.ANALYST_MODEL, settings.SCREENER_MODEL = "claude-opus-5-5", "claude-haiku-5-5"
    anthropic_server.script(ok(data=GOOD, thinking="...", model="claude-opus-5-5"))
    decide()
    body = anthropic_server.bodies()[0]
    assert body["model"] == "claude-opus-5-5"
    assert "temperature" not in body and "tool_choice" not in body and "tools" not in body
    assert body["thinking"] == {"type": "adaptive"} and body["output_config"]["effort"] == settings.LLM_EFFORT
    assert body["messages"][-1]["role"] == "user"  # no prefill
    assert body["output_config"]["format"]["schema"]["properties"]["decision"]


def test_an_answer_for_another_symbol_is_a_hold(anthropic_server):
    anthropic_server.script(ok(data={**GOOD, "decision": {**GOOD["decision"], "symbol": "ETH-USDT-SWAP"}}))
    assert decide().action == Action.HOLD


def test_the_api_key_never_reaches_the_journal(anthropic_server):
    from tests.conftest import TEST_KEY

    anthropic_server.script(error(401, "authentication_error", f"invalid x-api-key {TEST_KEY}"))
    decision = decide()
    row = LlmCall.objects.get()
    assert TEST_KEY not in row.parse_error + json.dumps(row.prompt) + decision.reasoning
    assert "[REDACTED]" in row.parse_error


def test_the_brain_object_reports_usage_for_the_screener_log(anthropic_server):
    anthropic_server.script(ok(data={"signal": True, "reason": "pullback"}, model="claude-haiku-4-5-20251001", input_tokens=480, output_tokens=25))
    brain = ClaudeBrain(playbook=None)
    screen = brain.screen(snapshot=f.pullback_long(), context=f.context())
    assert screen.signal and brain.last_result.tokens == 505
    assert brain.last_result.cost_usd == (Decimal(480) * 1 + Decimal(25) * 5) / Decimal(1_000_000)


NOT_A_MESSAGE = "the API answered with something that is not a Messages response"


def screen_call(timeout: float = 2.0) -> LlmResult[ScreenResult]:
    spec = CallSpec(purpose="screen", model="claude-haiku-4-5-20251001", max_tokens=200, timeout=timeout)
    return llm_call_structured(spec=spec, system_static=["You screen markets."],
                               user="BTC-USDT-SWAP pulls back to EMA20", output_type=ScreenResult)


@pytest.mark.parametrize(("reply", "detail"), [
    (proxy_page(), "text/html"),  # the SDK hands this back as a str
    (raw_body(200, '{"id": "msg_01", "type": "message", "content": [{"type": "te'), "JSONDecodeError"),  # cut off
    # Another vendor's API behind a misrouted base URL:
    (Reply(200, {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}), "its type is None"),
    (Reply(200, {**message_body("{}"), "usage": None}), "it has no usage"),
], ids=["html_page", "invalid_json", "foreign_json", "message_without_usage"])
def test_a_200_that_is_not_a_messages_response_is_a_recorded_error_not_an_exception(anthropic_server, reply, detail):
    anthropic_server.script(reply)  # every attempt
    result = screen_call()
    assert result.status == "error" and result.value is None
    assert result.reason.startswith(NOT_A_MESSAGE) and detail in result.reason and "HTTP 200" in result.reason
    rows = list(LlmCall.objects.order_by("id"))
    assert rows and [r.pk for r in rows] == result.call_ids
    for row in rows:
        assert row.status == "error" and row.completed_at is not None and not row.parsed
        assert row.parse_error.startswith(NOT_A_MESSAGE) and detail in row.parse_error
        assert row.cost_usd == Decimal("0") and row.input_tokens == 0


def test_a_proxy_page_is_retried_like_a_connection_error_and_then_answered(anthropic_server):
    answer = ok(data={"signal": True, "reason": "pullback"}, model="claude-haiku-4-5-20251001")
    anthropic_server.script(proxy_page(), answer)
    result = screen_call()
    assert result.status == "ok" and result.value.signal
    assert list(LlmCall.objects.order_by("id").values_list("status", "attempt")) == [("error", 1), ("ok", 2)]


def test_a_page_that_is_not_a_messages_response_ends_within_the_time_limit(anthropic_server):
    anthropic_server.script(proxy_page())
    started = time.monotonic()
    result = screen_call(timeout=1.0)
    assert time.monotonic() - started < 1.0
    assert result.status == "error" and LlmCall.objects.count() == 1  # no time for a retry in 1 s


def test_a_proxy_page_that_echoes_the_api_key_is_scrubbed(anthropic_server):
    from tests.conftest import TEST_KEY

    anthropic_server.script(proxy_page(text=f"bad gateway for key {TEST_KEY}"))
    result = screen_call(timeout=1.0)
    row = LlmCall.objects.get()
    assert TEST_KEY not in row.parse_error + result.reason
    assert "[REDACTED]" in row.parse_error and "[REDACTED]" in result.reason


def test_the_analyst_holds_with_the_reason_when_a_proxy_answers_instead_of_the_api(anthropic_server, settings):
    settings.ANALYST_TIMEOUT_SECONDS = 1.0
    anthropic_server.script(proxy_page())
    decision = decide()
    assert decision.action == Action.HOLD and NOT_A_MESSAGE in decision.reasoning


def test_the_ledger_equals_what_an_honest_server_billed_for_a_repeated_prefix_and_one_below_the_minimum(
        anthropic_server, settings):
    from tests.fakes.anthropic_server import HonestModel

    model = HonestModel(open_rate=0.0)
    anthropic_server.handler(model.handle)
    settings.ANALYST_MODEL = "claude-opus-5-5"  # 512-token minimum: the analyst's static part is cached ...
    decide()  # ... but not by the first call: no other within 5 minutes, so no read is plausible
    decide()
    decide()
    settings.ANALYST_MODEL = "claude-opus-4-6"  # 4,096-token minimum: nothing cached, nothing marked
    decide()
    rows = list(LlmCall.objects.order_by("id"))
    billed = [(c.input_tokens, c.output_tokens, c.cache_write_tokens, c.cache_read_tokens) for c in model.calls]
    assert [(r.input_tokens, r.output_tokens, r.cache_write_tokens, r.cache_read_tokens) for r in rows] == billed
    (_, _, write1, read1), (_, _, write, read), (_, _, write2, read2), (_, _, write3, read3) = billed
    assert (write1, read1) == (0, 0)
    assert write > 1000 and read == 0 and (write2, read2) == (0, write) and (write3, read3) == (0, 0)
    assert model.calls[0].thinking_tokens > 0 and model.calls[3].thinking_tokens == 0  # adaptive on 5.5 only
    assert rows[2].cost_usd < rows[1].cost_usd


def test_the_analysts_prefix_is_marked_only_when_another_call_came_within_the_cache_ttl(anthropic_server, settings):
    # A write never read costs 1.25x: one instrument reviewed hourly marks nothing; calls minutes apart (several
    # instruments on one tick, a short interval) mark the prefix, so the next call reads it.
    from datetime import timedelta

    settings.ANALYST_MODEL = "claude-opus-5-5"
    anthropic_server.handler(lambda request: ok(data=GOOD, model="claude-opus-5-5"))
    decide()
    LlmCall.objects.update(created_at=F("created_at") - timedelta(minutes=60))  # that call an hour ago
    decide()
    LlmCall.objects.filter(pk=LlmCall.objects.order_by("-id")[0].pk).update(created_at=F("created_at") - timedelta(minutes=5, seconds=1))
    decide()  # the last call 5 min 1 s ago: its cache entry has expired
    decide()  # the last call a moment ago: a read is plausible
    marked = ["cache_control" in body["system"][-1] for body in anthropic_server.bodies()]
    assert marked == [False, False, False, True]


def test_a_replays_analyst_prefix_is_marked_by_its_virtual_clock(anthropic_server, settings, instrument):
    from datetime import timedelta

    from journal.models import Cycle, Mode

    settings.ANALYST_MODEL = "claude-opus-5-5"
    anthropic_server.handler(lambda request: ok(data=GOOD, model="claude-opus-5-5"))
    btc, start = instrument, f.NOW
    # Virtual minutes since the run's previous analyst call: none, 60, 2 (a short interval), 5 (expired), 0 (another
    # cycle at the same time, as a second instrument on the same tick is).
    offsets = [0, 60, 62, 67, 67]
    for minutes in offsets:
        cycle = Cycle.objects.create(instrument=btc, as_of=start + timedelta(minutes=minutes), mode=Mode.REPLAY,
                                     run_id="cache-run")
        decide(cycle_id=cycle.pk, mode=Mode.REPLAY)
    marked = ["cache_control" in body["system"][-1] for body in anthropic_server.bodies()]
    assert marked == [False, False, True, False, True]
