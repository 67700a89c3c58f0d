"""The position watch and the analyst's unchanged skip, through the SCREENING and ANALYZING stages.

The Claude brain talks to the local Messages API server; the cycles run as the
live worker runs them (each cycle's row written back, the last review read from
the journal) and as a replay runs them (the last review kept in memory).
"""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from brain.claude import ClaudeBrain
from journal.models import Cycle, CycleOutcome, CycleState, Mode, ScreenerLog
from market.models import Instrument
from tests.brain.factories import NOW, snapshot
from tests.fakes.anthropic_server import FakeAnthropic, Received, Reply, ok
from tradebot.stages import CycleWork, StageEnv, analyze, screen

INST = "BTC-USDT-SWAP"
FIVE_MIN = timedelta(minutes=5)
# A Monday noon with no scheduled release near it (the news window would be a trigger of its own).
START = NOW.replace(day=3, hour=3)
HOLD = {"decision": {"action": "HOLD", "symbol": INST}, "confidence": 0.4, "reasoning": "let the stop work"}


@pytest.fixture
def btc(db) -> Instrument:
    return Instrument.objects.create(
        inst_id=INST, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


class Analyst:
    """Answers every analyst call with HOLD, every screener call with a pass and every position check with `wake`
    (or `check_reply`, e.g. an error); counts them."""

    def __init__(self, *, wake: bool = False, check_reply: Reply | None = None) -> None:
        self.analyses: list[str] = []
        self.checks: list[dict[str, Any]] = []
        self.screens = 0
        self.wake, self.check_reply = wake, check_reply

    def __call__(self, request: Received) -> Reply:
        body = request.json()
        user = body["messages"][0]["content"]
        if "<market_snapshot>" in user:
            self.analyses.append(user)
            return ok(data=HOLD, model=body["model"])
        if "<position_check>" in user:
            self.checks.append(body)
            if self.check_reply is not None:
                return self.check_reply
            return ok(data={"wake": self.wake, "reason": "stop still far" if not self.wake else "momentum turned"},
                      model=body["model"], input_tokens=300, output_tokens=25)
        self.screens += 1
        return ok(data={"signal": True, "reason": "setup"}, model=body["model"])


def _position(*, open_: bool) -> tuple[Any, list[Any]]:
    account = SimpleNamespace(equity=Decimal("10000"), available_balance=Decimal("9000"), day_start_equity=Decimal("10000"),
                              peak_equity=Decimal("10000"))
    if not open_:
        return account, []
    position = SimpleNamespace(inst_id=INST, pos_side="long", size=Decimal("5"), notional_usd=Decimal("350"),
                               avg_px=Decimal("69800"), unrealized_pnl=Decimal("1"), leverage=Decimal("2"),
                               stop_loss=Decimal("68500"), take_profit=Decimal("72500"), opened_at=START)
    return account, [position]


def _env(mode: str, *, position: bool) -> StageEnv:
    return StageEnv(feed=None, exchange=None, mode=mode, run_id="watch-run" if mode == Mode.REPLAY else "",
                    recent_trades_provider=list, account_provider=lambda: _position(open_=position),
                    brain=ClaudeBrain(), defer_journal=mode == Mode.REPLAY)


def _cycle(btc: Instrument, env: StageEnv, at: Any, price: float) -> Cycle:
    """SCREENING then (when it goes on) ANALYZING, as a worker runs them; the row written back as a task does."""
    cycle = Cycle.objects.create(instrument=btc, as_of=at, state=CycleState.SCREENING, mode=env.mode, run_id=env.run_id)
    work = CycleWork(cycle=cycle, _snapshot=snapshot(price=price, ts=at, change_1h=0.001))
    if not env.defer_journal:
        cycle.snapshot = work.snapshot.as_jsonable()  # as COLLECTING leaves it live
    if screen(work, env):
        cycle.state = CycleState.ANALYZING
        analyze(work, env)
    if work.extra.get("screener_log") is not None:
        work.extra["screener_log"].save()
    cycle.save()
    return cycle


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REPLAY])
def test_a_position_whose_price_does_not_move_is_reviewed_only_at_the_max_interval(
        btc: Instrument, anthropic_server: FakeAnthropic, settings, mode: str) -> None:
    settings.POSITION_WATCH_MAX_INTERVAL_SECONDS = 3600
    settings.POSITION_WATCH_PERIODIC_CHECK = False  # the routine review goes to the analyst itself (test_position_check)
    analyst = Analyst()
    anthropic_server.handler(analyst)
    env = _env(mode, position=True)
    cycles = [_cycle(btc, env, START + i * FIVE_MIN, 70000.0) for i in range(25)]  # two hours and five minutes
    reviewed = [i for i, c in enumerate(cycles) if c.decision]
    # The first cycle reviews (no review of the position yet), then one every 60 minutes (12 cycles).
    assert reviewed == [0, 12, 24]
    assert len(analyst.analyses) == 3 and analyst.screens == 0 and not analyst.checks  # no screener, no check
    skipped = [c for i, c in enumerate(cycles) if i not in reviewed]
    assert all(c.outcome == CycleOutcome.NO_SIGNAL and "position watch: no trigger" in c.reason for c in skipped)
    # Every skip is journaled with its reason, like a screener's "no".
    logs = ScreenerLog.objects.filter(cycle__in=skipped)
    assert logs.count() == len(skipped)
    assert all(row.bypassed and not row.signal and row.bypass_reason == "position watch"
               and row.reason.startswith("position watch: no trigger") for row in logs)
    assert "max interval" in ScreenerLog.objects.get(cycle=cycles[12]).bypass_reason


@pytest.mark.parametrize("mode", [Mode.LIVE, Mode.REPLAY])
def test_a_move_of_the_trigger_size_brings_a_review_at_the_next_cycle(
        btc: Instrument, anthropic_server: FakeAnthropic, settings, mode: str) -> None:
    settings.POSITION_WATCH_ATR_MULTIPLE = Decimal("1.0")
    analyst = Analyst()
    anthropic_server.handler(analyst)
    env = _env(mode, position=True)
    # The factory's 1H ATR is 0.6% of the price: ~422 at these prices. 0.9 ATR is no trigger; 1.02 ATR is.
    prices = [70000.0, 70100.0, 70378.0, 70430.0, 70430.0]
    cycles = [_cycle(btc, env, START + i * FIVE_MIN, p) for i, p in enumerate(prices)]
    assert [bool(c.decision) for c in cycles] == [True, False, False, True, False]
    log = ScreenerLog.objects.get(cycle=cycles[3])
    assert log.bypass_reason.startswith("position watch: price moved") and "ATR" in log.bypass_reason
    assert "no trigger (0.90 ATR" in cycles[2].reason


def test_stop_loss_near_and_a_regime_change_are_triggers(btc: Instrument, anthropic_server: FakeAnthropic) -> None:
    analyst = Analyst()
    anthropic_server.handler(analyst)
    env = _env(Mode.LIVE, position=True)
    first = _cycle(btc, env, START, 68800.0)  # the first review
    near = _cycle(btc, env, START + FIVE_MIN, 68700.0)  # 200 from the 68,500 stop: < 0.5 ATR (~206)
    assert first.decision and near.decision
    assert ScreenerLog.objects.get(cycle=near).bypass_reason.startswith("position watch: stop loss near")


def test_flat_after_a_hold_the_analyst_is_not_asked_again_until_the_snapshot_changes(
        btc: Instrument, anthropic_server: FakeAnthropic, settings) -> None:
    settings.ANALYST_UNCHANGED_MAX_SECONDS = 1800
    analyst = Analyst()
    anthropic_server.handler(analyst)
    env = _env(Mode.LIVE, position=False)
    prices = [70000.0, 70050.0, 70100.0, 70300.0, 70300.0]  # 0.5 ATR (210) from the HOLD's price at the 4th
    cycles = [_cycle(btc, env, START + i * FIVE_MIN, p) for i, p in enumerate(prices)]
    assert [bool(c.decision) for c in cycles] == [True, False, False, True, False]
    assert analyst.screens == 5  # the screener still looks at every cycle (it passes them all here)
    for skipped in (cycles[1], cycles[2], cycles[4]):
        assert skipped.outcome == CycleOutcome.NO_SIGNAL
        assert skipped.reason.startswith("analyst skipped: snapshot unchanged since its HOLD")
        assert skipped.stage_times[CycleState.ANALYZING]["skipped"] == skipped.reason
    # After ANALYST_UNCHANGED_MAX_SECONDS the analyst is asked again even though nothing moved.
    later = _cycle(btc, env, START + 4 * FIVE_MIN + timedelta(seconds=1800), 70300.0)
    assert later.decision


def test_the_rules_brain_still_decides_every_cycle_with_a_position_open(btc: Instrument) -> None:
    # It costs nothing: neither the watch nor the unchanged skip applies to it.
    env = StageEnv(feed=None, exchange=None, mode=Mode.LIVE, brain_name="rules", recent_trades_provider=list,
                   account_provider=lambda: _position(open_=True))
    cycles = [_cycle(btc, env, START + i * FIVE_MIN, 70000.0) for i in range(3)]
    assert all(c.decision and c.brain == "rules" for c in cycles)

