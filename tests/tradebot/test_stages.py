"""The stage functions on their own (no broker): what RISK_CHECK does with the bot's state."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from execution.exchanges.paper import PaperExchange
from execution.models import BotState, BotStatus
from journal.models import Cycle, CycleOutcome, CycleState, Mode
from market.models import Instrument
from tests.brain.factories import NOW, snapshot
from tests.execution.helpers import decision
from tradebot.stages import CycleWork, StageEnv, risk


@pytest.fixture
def btc(db) -> Instrument:
    return Instrument.objects.create(
        inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


def _work(btc: Instrument, env: StageEnv) -> CycleWork:
    cycle = Cycle.objects.create(instrument=btc, as_of=NOW, state=CycleState.RISK_CHECK, mode=env.mode, run_id=env.run_id)
    snap = snapshot(price=65000.0, ts=NOW)
    env.exchange.set_price(btc.inst_id, snap.price, NOW)
    return CycleWork(cycle=cycle, _snapshot=snap, _decision=decision("OPEN_LONG"))


def _cooldown(scope: str, until_offset: timedelta) -> None:
    BotState.objects.update_or_create(scope=scope, defaults=dict(
        state=BotStatus.COOLDOWN, reason="3 consecutive losses", consecutive_losses=3,
        since=NOW - timedelta(minutes=40), until=NOW + until_offset, day_start_equity=Decimal("10000"),
        peak_equity=Decimal("10000")))


def test_a_cooldown_whose_time_is_up_is_lifted_and_the_decision_goes_to_the_gate(btc: Instrument) -> None:
    env = StageEnv(feed=None, exchange=PaperExchange(account_name="stages-lift"))
    _cooldown(env.scope, -timedelta(minutes=10))
    work = _work(btc, env)
    assert risk(work, env) is True, work.cycle.reason
    assert work.cycle.risk_verdict["approved"] is True
    row = BotState.objects.get(scope=env.scope)
    assert row.state == BotStatus.RUNNING and row.consecutive_losses == 0


def test_a_cooldown_still_running_halts_the_cycle(btc: Instrument) -> None:
    env = StageEnv(feed=None, exchange=PaperExchange(account_name="stages-hold"))
    _cooldown(env.scope, timedelta(minutes=10))
    work = _work(btc, env)
    assert risk(work, env) is False
    assert work.cycle.outcome == CycleOutcome.HALTED and "COOLDOWN" in work.cycle.reason
    assert BotState.objects.get(scope=env.scope).state == BotStatus.COOLDOWN


def test_a_replay_asks_its_own_bot_state_provider_and_the_lift_still_happens(btc: Instrument) -> None:
    from execution.selectors import bot_state

    calls = []
    env = StageEnv(feed=None, exchange=PaperExchange(account_name="stages-replay"), mode=Mode.REPLAY, run_id="r-stages")
    _cooldown(env.scope, -timedelta(minutes=1))
    known = bot_state(scope=env.scope)
    env.bot_provider = lambda: calls.append(1) or known
    work = _work(btc, env)
    assert risk(work, env) is True
    assert calls == [1]
    assert BotState.objects.get(scope=env.scope).state == BotStatus.RUNNING


# --- the brain's recent trades --------------------------------------------------------


def _trade(btc: Instrument, i: int, *, run_id: str = "", status: str = "open") -> Any:
    from journal.models import Trade

    return Trade.objects.create(
        instrument=btc, mode=Mode.LIVE, run_id=run_id, opened_at=NOW - timedelta(hours=50 - i), direction="LONG",
        entry_price=Decimal("70000") + i, stop_loss=Decimal("69000"), take_profit=Decimal("72000"), size=Decimal("1"),
        strategy_used="trend_pullback", market_regime="trending_up", confidence_at_entry=Decimal("0.6"),
        status=status, reasoning=f"trade {i}", indicators_entry={"1H": {"rsi_14": 40 + i}},
    )


def _full_read(limit: int = 20) -> list[Any]:
    from brain.reflection import trade_view_from_row
    from journal.models import Trade

    rows = Trade.objects.filter(mode=Mode.LIVE, run_id="").select_related("instrument").order_by("-opened_at", "-id")
    return [trade_view_from_row(t) for t in rows[:limit]]


def test_recent_trades_equal_a_full_read_after_opens_closes_and_edits(btc: Instrument, django_assert_num_queries: Any) -> None:
    from tradebot.brain_views import TradeViews

    views = TradeViews(mode=Mode.LIVE, run_id="")
    trades = [_trade(btc, i) for i in range(23)]
    _trade(btc, 30, run_id="replay-x")  # another run's trade is never among them
    assert views.read() == _full_read()
    assert [v.id for v in views.read()] == [t.pk for t in reversed(trades[-20:])]

    # Nothing changed: one light read, no row read in full.
    with django_assert_num_queries(1):
        again = views.read()
    assert again == _full_read()

    # A close (status, exit, PnL), an edit of a JSON column through save(), a new trade.
    closing = trades[-1]
    closing.status, closing.exit_price, closing.pnl_usd = "closed", Decimal("70100"), Decimal("1.5")
    closing.closed_at = NOW
    closing.save()
    edited = trades[-5]
    edited.indicators_entry = {"1H": {"rsi_14": 99}}
    edited.save()
    newest = _trade(btc, 40)
    with django_assert_num_queries(2):  # the light read, then the three changed rows in full
        got = views.read()
    assert got == _full_read()
    assert got[0].id == newest.pk and got[1].status == "closed" and got[5].indicators_entry == {"1H": {"rsi_14": 99}}
    assert len(got) == 20

    # A key column changed by an UPDATE that leaves updated_at alone is seen too (the key is read as text).
    from journal.models import Trade

    Trade.objects.filter(pk=closing.pk).update(pnl_usd=Decimal("2.50"))
    got = views.read()
    assert got == _full_read() and got[1].pnl_usd == Decimal("2.50")


def test_recent_trades_forget_a_deleted_trade(btc: Instrument) -> None:
    from tradebot.brain_views import TradeViews

    views = TradeViews(mode=Mode.LIVE, run_id="", limit=5)
    trades = [_trade(btc, i) for i in range(6)]
    assert [v.id for v in views.read()] == [t.pk for t in reversed(trades[1:])]
    trades[-1].delete()
    assert [v.id for v in views.read()] == [t.pk for t in reversed(trades[:5])]
