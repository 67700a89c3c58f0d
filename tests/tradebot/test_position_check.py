"""The position watch's routine check: the screener model decides whether the analyst is worth waking.

Through the SCREENING and ANALYZING stages with the Claude brain against the local Messages API server, as
the live worker runs them (the last review and the checks since read back from the journal) and as a replay
runs them (kept in memory).
"""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from brain.budget import spent_today
from journal.models import Cycle, CycleOutcome, LlmCall, Mode, ScreenerLog
from market.models import Instrument
from tests.fakes.anthropic_server import FakeAnthropic, error, ok
from tests.tradebot.test_position_watch import FIVE_MIN, START, Analyst, _cycle, _env, btc  # noqa: F401 (fixture)

HOUR = 12  # cycles


@pytest.fixture(autouse=True)
def _watch(settings) -> None:
    settings.POSITION_WATCH_PERIODIC_CHECK = True
    settings.POSITION_WATCH_MAX_INTERVAL_SECONDS = 3600
    settings.POSITION_WATCH_MAX_UNREVIEWED_SECONDS = 4 * 3600


def _flat(btc: Instrument, env, n: int, price: float = 70000.0) -> list[Cycle]:
    return [_cycle(btc, env, START + i * FIVE_MIN, price) for i in range(n)]


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REPLAY])
def test_a_routine_review_is_a_screener_model_check_and_no_analyst_call_when_it_says_no(
        btc: Instrument, anthropic_server: FakeAnthropic, settings, mode: str) -> None:
    analyst = Analyst(wake=False)
    anthropic_server.handler(analyst)
    env = _env(mode, position=True)
    cycles = _flat(btc, env, 2 * HOUR + 1)
    # The first cycle reviews the new position; at 60 and 120 minutes (the second counted from the first check)
    # the screener model is asked instead, says no, and the analyst is not called.
    assert [i for i, c in enumerate(cycles) if c.decision] == [0]
    assert len(analyst.analyses) == 1 and len(analyst.checks) == 2
    calls = LlmCall.objects.filter(purpose="position_check").order_by("id")
    assert [c.model for c in calls] == [settings.SCREENER_MODEL] * 2 and all(c.status == "ok" for c in calls)
    prompt = calls[0].prompt["messages"][0]["content"]
    # A frozen view of the position: PnL in R, distance to SL/TP in ATR, indicator changes since the review.
    assert "pnl: +0.15 R" in prompt and "stop_loss: 68500 (3.57 ATR" in prompt and "take_profit: 72500" in prompt
    assert "last_analyst_review: 2026-02-03 03:00 (60 min ago), said HOLD" in prompt and "rsi_1h: 55.0 -> 55.0" in prompt
    for i in (HOUR, 2 * HOUR):
        c = cycles[i]
        assert c.outcome == CycleOutcome.NO_SIGNAL and c.reason.startswith("no signal: position check: no: stop still far")
        assert c.screener_result["position_check"]["wake"] is False
        log = ScreenerLog.objects.get(cycle=c)
        assert log.bypass_reason == "position check" and log.model == settings.SCREENER_MODEL
        assert log.cost_usd > 0 and not log.signal
    # Between checks the watch skips, saying when it last checked.
    assert "checked at 04:00" in cycles[HOUR + 1].reason
    if mode == Mode.LIVE:
        # Counted in the budget (the live one: today's wall-clock spending) like every call.
        assert sum(c.cost_usd for c in calls) > 0
        assert spent_today(now=datetime.now(UTC)) == sum(c.cost_usd for c in LlmCall.objects.all())


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REPLAY])
def test_a_check_that_says_wake_calls_the_analyst(btc: Instrument, anthropic_server: FakeAnthropic, mode: str) -> None:
    analyst = Analyst(wake=True)
    anthropic_server.handler(analyst)
    env = _env(mode, position=True)
    cycles = _flat(btc, env, 2 * HOUR + 1)
    assert [i for i, c in enumerate(cycles) if c.decision] == [0, HOUR, 2 * HOUR]
    assert len(analyst.checks) == 2 and len(analyst.analyses) == 3
    log = ScreenerLog.objects.get(cycle=cycles[HOUR])
    assert log.bypass_reason == "position check" and log.signal and "wake: momentum turned" in log.reason


def test_a_trigger_calls_the_analyst_directly_even_when_a_routine_review_is_due(
        btc: Instrument, anthropic_server: FakeAnthropic) -> None:
    analyst = Analyst(wake=False)
    anthropic_server.handler(analyst)
    env = _env(Mode.LIVE, position=True)
    first = _cycle(btc, env, START, 70000.0)
    checked = _cycle(btc, env, START + HOUR * FIVE_MIN, 70000.0)  # routine: a check that says no
    moved = _cycle(btc, env, START + (2 * HOUR) * FIVE_MIN, 70430.0)  # 1.02 ATR and the next routine review due
    assert first.decision and not checked.decision and moved.decision
    assert len(analyst.checks) == 1 and len(analyst.analyses) == 2
    assert ScreenerLog.objects.get(cycle=moved).bypass_reason.startswith("position watch: price moved 1.02 ATR")


@pytest.mark.parametrize("reply", [
    error(500, "api_error", "Internal server error"),  # retried to the deadline, then an error
    ok("not json at all"),  # invalid twice
    "timeout",
], ids=["http-500", "bad-json", "timeout"])
def test_a_check_that_fails_wakes_the_analyst(btc: Instrument, anthropic_server: FakeAnthropic, settings, reply) -> None:
    settings.SCREENER_TIMEOUT_SECONDS = 1.0
    if reply == "timeout":
        reply = ok(data={"wake": False, "reason": "late"})
        reply.delay = 2.0
    analyst = Analyst(check_reply=reply)
    anthropic_server.handler(analyst)
    env = _env(Mode.LIVE, position=True)
    _cycle(btc, env, START, 70000.0)
    routine = _cycle(btc, env, START + HOUR * FIVE_MIN, 70000.0)
    assert routine.decision and len(analyst.analyses) == 2  # the safe side: the analyst reviews
    check = routine.screener_result["position_check"]
    assert check["wake"] is True and check["status"] in ("error", "invalid", "timeout")
    assert check["reason"].startswith(f"position check {check['status']}")
    rows = LlmCall.objects.filter(purpose="position_check")
    assert rows.exists() and all(r.status != "ok" for r in rows)


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REPLAY])
def test_the_hard_maximum_forces_the_analysts_review(btc: Instrument, anthropic_server: FakeAnthropic, settings,
                                                      mode: str) -> None:
    settings.POSITION_WATCH_MAX_UNREVIEWED_SECONDS = 3 * 3600
    analyst = Analyst(wake=False)
    anthropic_server.handler(analyst)
    env = _env(mode, position=True)
    cycles = _flat(btc, env, 4 * HOUR + 1)
    # Checks at 1 h and 2 h say no; at 3 h the review is the hard maximum's, without a check; then it starts over.
    assert [i for i, c in enumerate(cycles) if c.decision] == [0, 3 * HOUR]
    assert len(analyst.checks) == 3 and len(analyst.analyses) == 2
    forced = ScreenerLog.objects.get(cycle=cycles[3 * HOUR])
    assert forced.bypass_reason.startswith("position watch: hard maximum: 3.0 h since the last review (2 position")
    assert "position_check" not in cycles[3 * HOUR].screener_result
    assert cycles[4 * HOUR].screener_result["position_check"]["checks_before"] == 0


def test_with_the_check_off_the_max_interval_calls_the_analyst(btc: Instrument, anthropic_server: FakeAnthropic,
                                                              settings) -> None:
    settings.POSITION_WATCH_PERIODIC_CHECK = False
    analyst = Analyst(wake=False)
    anthropic_server.handler(analyst)
    cycles = _flat(btc, _env(Mode.LIVE, position=True), HOUR + 1)
    assert [i for i, c in enumerate(cycles) if c.decision] == [0, HOUR] and not analyst.checks
    assert Decimal(0) == sum((c.cost_usd for c in LlmCall.objects.filter(purpose="position_check")), Decimal(0))
