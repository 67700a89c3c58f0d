"""Replay runs: isolation between runs, funding, snapshots equal to live, the exclusive paper exchange."""
from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

from execution.exchanges.paper import PaperExchange
from execution.exchanges.paper_market import next_funding_after
from execution.models import BotState, PaperAccount
from journal.models import Cycle, CycleOutcome, Mode, ScreenerLog, Trade, TradeStatus
from market.feeds.synthetic import SyntheticFeed
from market.models import Instrument
from market.snapshot import snapshot_build
from tradebot.replay import FrameSnapshots, replay_run

INST = "BTC-USDT-SWAP"
FROM = datetime(2025, 8, 1, tzinfo=UTC)
TO = datetime(2025, 8, 3, tzinfo=UTC)


@pytest.fixture(scope="module")
def feed() -> SyntheticFeed:
    # Enough history before FROM for a full 1000-candle 15m window; generated once for the module.
    return SyntheticFeed(seed=7, start=datetime(2025, 6, 15, tzinfo=UTC), end=datetime(2025, 8, 5, tzinfo=UTC))


def _trades(run_id: str) -> list[Trade]:
    return list(Trade.objects.filter(mode=Mode.REPLAY, run_id=run_id).order_by("opened_at", "id"))


@pytest.mark.django_db
def test_two_replays_in_one_database_keep_their_own_trades_accounts_and_bot_states(feed: SyntheticFeed) -> None:
    first = replay_run(inst_id=INST, start=FROM, end=TO, feed=feed, run_id="run-a")
    second = replay_run(inst_id=INST, start=FROM, end=TO, feed=feed, run_id="run-b")
    a, b = _trades("run-a"), _trades("run-b")
    assert a, "the scenario must trade"
    # Same data, same brain: the same trades. Had the second run matched the first run's open
    # trades or shared its balance or bot state, its figures would differ.
    assert [(t.opened_at, t.direction, t.entry_price, t.pnl_usd, t.status) for t in a] == \
           [(t.opened_at, t.direction, t.entry_price, t.pnl_usd, t.status) for t in b]
    assert {t.run_id for t in a} == {"run-a"} and {t.run_id for t in b} == {"run-b"}
    assert first.decisions == second.decisions
    da, db_ = first.as_dict(), second.as_dict()
    for key in ("trades", "closed_trades", "pnl_usd", "fees_usd", "funding_usd", "outcomes", "screened", "bypassed"):
        assert da[key] == db_[key], key
    assert set(BotState.objects.filter(scope__startswith="replay:").values_list("scope", flat=True)) == {"replay:run-a", "replay:run-b"}
    assert not BotState.objects.filter(scope="live").exclude(day_start_equity=None).exists()
    assert PaperAccount.objects.filter(name__in=["run-a", "run-b"]).count() == 2
    # Every cycle and every screener log row is journaled (in bulk), each under its own run.
    cycles = Cycle.objects.filter(mode=Mode.REPLAY, run_id="run-a")
    assert cycles.count() == first.cycles
    assert ScreenerLog.objects.filter(cycle__run_id="run-a").count() == first.cycles


@pytest.mark.django_db
@pytest.mark.parametrize("full", ["acted", "analyzed"])
def test_a_replay_keeps_the_full_snapshot_only_where_asked(feed: SyntheticFeed, full: str) -> None:
    summary = replay_run(inst_id=INST, start=FROM, end=TO, feed=feed, run_id=f"run-s-{full}", full_snapshots=full)
    cycles = list(Cycle.objects.filter(run_id=summary.run_id))
    kept = [c for c in cycles if c.decision and (full == "analyzed" or c.outcome != CycleOutcome.HOLD)]
    others = [c for c in cycles if c not in kept]
    assert kept and others
    assert all("timeframes" in c.snapshot for c in kept)
    assert all(c.snapshot["compact"] and "timeframes" not in c.snapshot and c.snapshot["price"] for c in others)
    log = ScreenerLog.objects.get(cycle=kept[0])
    assert log.snapshot_json["compact"] and log.snapshot_json["price"] == kept[0].snapshot["price"]


@pytest.mark.django_db
def test_a_position_held_across_a_funding_time_pays_or_receives_the_feeds_rate(feed: SyntheticFeed) -> None:
    summary = replay_run(inst_id=INST, start=FROM, end=TO, feed=feed, run_id="run-f")
    closed = [t for t in _trades("run-f") if t.status == TradeStatus.CLOSED]
    across = [t for t in closed if next_funding_after(t.opened_at) <= t.closed_at]
    assert across, "the scenario must hold a position over a funding time"
    assert all(t.funding_usd != 0 for t in across)
    assert all(t.funding_usd == 0 for t in closed if t not in across)
    assert Decimal(summary.as_dict()["funding_usd"]) == sum((t.funding_usd for t in closed), Decimal(0)).quantize(Decimal("0.01"))


@pytest.mark.django_db
def test_a_trade_closed_by_its_stop_or_take_profit_keeps_the_last_cycles_indicators(feed: SyntheticFeed) -> None:
    replay_run(inst_id=INST, start=FROM, end=TO, feed=feed, run_id="run-x")
    by_exchange = [t for t in _trades("run-x") if t.exit_reason in ("stop_loss", "take_profit")]
    assert by_exchange, "the scenario must hit a stop or a take-profit"
    snapshots = FrameSnapshots(feed, INST, TO)
    for trade in by_exchange:
        # The cycles run every 5 minutes from FROM; the last one at or before the close saw the market then.
        last = FROM + (trade.closed_at - FROM) // timedelta(minutes=5) * timedelta(minutes=5)
        expected = {tf: view["indicators"] for tf, view in snapshots(INST, last).as_jsonable()["timeframes"].items()}
        assert trade.indicators_exit == expected, trade.closed_at


@pytest.mark.django_db
def test_snapshots_inside_the_replay_loop_equal_the_live_build_at_the_same_clock(feed: SyntheticFeed) -> None:
    snapshots = FrameSnapshots(feed, INST, TO)
    # Consecutive cycles reuse the 1H/4H views; the times cross a 15m, a 1H and a 4H close.
    times = [datetime(2025, 8, 1, 3, 40, tzinfo=UTC) + timedelta(minutes=5 * i) for i in range(6)]
    for t in times:
        replayed = snapshots(INST, t)
        feed.set_clock(t)
        live = snapshot_build(feed=feed, inst_id=INST, as_of=t)
        a, b = replayed.model_dump(mode="json"), live.model_dump(mode="json")
        for tf in live.timeframes:
            ia, ib = a["timeframes"][tf].pop("indicators"), b["timeframes"][tf].pop("indicators")
            for name, y in ib.items():
                x = ia[name]
                if isinstance(y, float):
                    assert x == pytest.approx(y, rel=1e-9, abs=1e-12), (t, tf, name)
                else:
                    assert x == y, (t, tf, name)
        assert a == b, t


def _bar(ts: datetime, o: str, h: str, lo: str, c: str) -> SimpleNamespace:
    return SimpleNamespace(ts=ts, open=Decimal(o), high=Decimal(h), low=Decimal(lo), close=Decimal(c))


@pytest.mark.django_db
@pytest.mark.parametrize("with_limit", [True, False])
def test_the_exclusive_paper_exchange_gives_the_same_book_as_the_database_one(with_limit: bool) -> None:
    # Without the resting limit order the funding and stop bars update the in-memory book from the
    # rows they wrote; with it, the book is read again.
    from tests.execution.helpers import approve, decision

    Instrument.objects.create(inst_id=INST, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
                              tick_sz=Decimal("0.1"), max_lever=Decimal("100"))
    plain = PaperExchange(account_name=f"plain-{with_limit}")
    fast = PaperExchange(account_name=f"fast-{with_limit}", exclusive=True)
    t0 = datetime(2025, 8, 1, 7, 50, tzinfo=UTC)

    def book(ex: PaperExchange) -> list:
        return [[replace(p, pos_id="") for p in ex.positions()], ex.account(),
                [replace(c, pos_id="") for c in ex.closed_positions()], ex.now()]

    bars = [_bar(t0 + timedelta(minutes=5 * i), *row) for i, row in enumerate([
        ("50000", "50050", "49950", "50000"),  # a price: the market order fills at it (+ slippage)
        ("50000", "50100", "49980", "50080"),
        ("50080", "50120", "50010", "50100"),  # opens at 08:00: funding is charged
        ("50100", "50200", "50050", "50150"),
        ("50150", "50160", "49400", "49450"),  # the resting buy at 49500 fills
        ("49450", "49500", "48500", "48600"),  # the stop at 48600 triggers
        ("48600", "48700", "48550", "48650"),
    ])]
    market = approve(decision(size_pct=0.05, leverage=2, stop_loss=49000.0, take_profit=52000.0), last="50000", cycle_id=1)
    limit = approve(decision(order_type="limit", limit_price=49500.0, size_pct=0.05, leverage=2, stop_loss=48600.0,
                             take_profit=51000.0), last="50000", cycle_id=2)
    for ex in (plain, fast):
        ex.set_funding_rate(INST, Decimal("0.0001"))
    for i, bar in enumerate(bars):
        for ex in (plain, fast):
            ex.process_bar(INST, bar)
            if i == 0:
                ex.place_order(market)
                if with_limit:
                    ex.place_order(limit)
        assert book(plain) == book(fast), i
    closed = plain.closed_positions()
    assert len(closed) == 1 and closed[0].funding != 0 and closed[0].close_reason == "stop_loss"
    assert fast.closes == 1 and not fast.exposed()


@pytest.mark.django_db
def test_a_replay_gives_the_garbage_collector_back_as_it_found_it_even_when_it_fails(
        feed: SyntheticFeed, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    import tradebot.replay as replay_module

    assert gc.isenabled()
    seen = []
    real = replay_module._run_batch

    def batch_then_fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))  # inside the loop: paused, history frozen
        real(*args, **kwargs)
        raise RuntimeError("the database went away")

    monkeypatch.setattr(replay_module, "_run_batch", batch_then_fail)
    with pytest.raises(RuntimeError, match="went away"):
        replay_run(inst_id=INST, start=FROM, end=FROM + timedelta(hours=2), feed=feed, run_id="run-gc")
    assert seen == [(False, True)]
    # Collecting again, nothing left frozen (what was frozen goes back to the collector).
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.django_db
def test_replay_cycles_say_when_they_ran_and_never_end_before_they_start_even_when_one_fails(
        feed: SyntheticFeed, monkeypatch: pytest.MonkeyPatch) -> None:
    from django.utils import timezone

    import tradebot.replay as replay_module

    broken_at = FROM + timedelta(minutes=30)

    def screen_or_fail(work, env):  # noqa: ANN001, ANN202 - a fault injected into one cycle's stage
        if work.cycle.as_of == broken_at:
            raise ValueError("a malformed payload")
        return screen(work, env)

    stages = list(replay_module.STAGES)
    index = next(i for i, (name, _, _) in enumerate(stages) if name == "SCREENING")
    screen = stages[index][1]
    stages[index] = ("SCREENING", screen_or_fail, stages[index][2])
    monkeypatch.setattr(replay_module, "STAGES", stages)
    began = timezone.now()
    summary = replay_run(inst_id=INST, start=FROM, end=FROM + timedelta(hours=2), feed=feed, run_id="run-times")
    ended = timezone.now()
    cycles = list(Cycle.objects.filter(run_id=summary.run_id).order_by("as_of"))
    assert len(cycles) == summary.cycles == 24
    failed = [c for c in cycles if c.outcome == CycleOutcome.ERROR]
    assert [(c.as_of, c.state) for c in failed] == [(broken_at, "FAILED")] and "malformed payload" in failed[0].reason
    # Wall-clock times of the run, each cycle's start at or before its end, cycles in the order they ran.
    assert all(began <= c.started_at <= c.ended_at <= ended for c in cycles), [(c.started_at, c.ended_at) for c in cycles[:3]]
    assert all(a.ended_at <= b.started_at for a, b in zip(cycles, cycles[1:]))
