"""`journal.report.run_report`: every figure recomputed here from the rows the test wrote."""
from __future__ import annotations

import csv
import math
import statistics
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from journal.models import Cycle, Mode, Trade, TradeStatus
from journal.report import ReportError, report_lines, run_report, trades_csv
from market.models import Candle, Instrument

T0 = datetime(2025, 1, 1, tzinfo=UTC)
RUN = "replay-report-a"
# (closed at, PnL, strategy, exit reason, fees): the run's closed trades, in close order.
CLOSES = [
    (T0 + timedelta(hours=10), Decimal("100"), "trend_pullback", "take_profit", Decimal("1.5")),
    (T0 + timedelta(days=1, hours=12), Decimal("-300"), "breakout", "stop_loss", Decimal("2")),
    (T0 + timedelta(days=1, hours=18), Decimal("-50"), "breakout", "stop_loss", Decimal("0.5")),
    (T0 + timedelta(days=3, hours=9), Decimal("400"), "trend_pullback", "take_profit", Decimal("1")),
    (T0 + timedelta(days=31, hours=3), Decimal("0"), "range_fade", "signal", Decimal("0.25")),
]
END = T0 + timedelta(days=32)


def _instrument(inst_id: str = "BTC-USDT-SWAP") -> Instrument:
    return Instrument.objects.get_or_create(inst_id=inst_id, defaults=dict(
        ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"), tick_sz=Decimal("0.1")))[0]


def _trade(inst: Instrument, *, run_id: str = RUN, mode: str = Mode.REPLAY, opened_at: datetime,
           closed_at: datetime | None, pnl: Decimal | None, strategy: str = "s", exit_reason: str = "",
           fees: Decimal = Decimal(0), funding: Decimal = Decimal(0)) -> Trade:
    return Trade.objects.create(
        instrument=inst, mode=mode, run_id=run_id, opened_at=opened_at, closed_at=closed_at, direction="LONG",
        entry_price=Decimal("100"), exit_price=Decimal("101") if closed_at else None, stop_loss=Decimal("95"),
        size=Decimal("1"), pnl_usd=pnl, pnl_pct=None if pnl is None else pnl / 1000, fees_usd=fees,
        funding_usd=funding, strategy_used=strategy, exit_reason=exit_reason,
        duration_seconds=int((closed_at - opened_at).total_seconds()) if closed_at else None,
        status=TradeStatus.CLOSED if closed_at else TradeStatus.OPEN,
    )


@pytest.fixture
def journal_rows(settings) -> Instrument:
    settings.PAPER_START_BALANCE = Decimal("10000")
    inst = _instrument()
    # The run's first and last cycles give its period; their snapshots hold the price they saw.
    Cycle.objects.create(instrument=inst, mode=Mode.REPLAY, run_id=RUN, as_of=T0, snapshot={"price": "100"})
    Cycle.objects.create(instrument=inst, mode=Mode.REPLAY, run_id=RUN, as_of=T0 + timedelta(days=5),
                         snapshot={"compact": True, "price": "104"})
    Cycle.objects.create(instrument=inst, mode=Mode.REPLAY, run_id=RUN, as_of=END, snapshot={"price": "120"})
    for closed_at, pnl, strategy, reason, fees in CLOSES:
        _trade(inst, opened_at=closed_at - timedelta(hours=2), closed_at=closed_at, pnl=pnl, strategy=strategy,
               exit_reason=reason, fees=fees, funding=Decimal("-0.1"))
    _trade(inst, opened_at=END - timedelta(hours=1), closed_at=None, pnl=None, strategy="breakout")
    # Rows of another run and of the live bot: never in this run's report.
    _trade(inst, run_id="replay-other", opened_at=T0, closed_at=T0 + timedelta(hours=1), pnl=Decimal("999"))
    _trade(inst, run_id="", mode=Mode.LIVE, opened_at=T0, closed_at=T0 + timedelta(hours=1), pnl=Decimal("-999"))
    return inst


def _daily_returns(start: datetime, end: datetime, closes: list[tuple[datetime, Decimal]],
                   balance: Decimal) -> list[float]:
    returns, day = [], start.date()
    while day <= end.date():
        change = sum((p for when, p in closes if when.date() == day), Decimal(0))
        returns.append(float(change / balance))
        balance += change
        day += timedelta(days=1)
    return returns


@pytest.mark.django_db
def test_the_report_of_a_run_is_what_its_rows_say(journal_rows: Instrument) -> None:
    report = run_report(mode=Mode.REPLAY, run_id=RUN)
    pnls = [p for _, p, *_ in CLOSES]
    assert (report.start, report.end) == (T0, END)
    assert report.starting_balance == Decimal("10000") and report.final_balance == Decimal("10150")
    assert report.pnl_usd == sum(pnls) and report.pnl_pct == Decimal("150") / Decimal("10000")
    assert len(report.trades) == 6 and report.closed_trades == 5 and report.open_trades == 1
    assert (report.wins, report.draws, report.losses) == (2, 1, 2) and report.win_rate == Decimal("0.4")
    assert report.profit_factor == (Decimal(500) / Decimal(350)).quantize(Decimal("0.0001"))
    assert report.fees_usd == sum(f for *_, f in CLOSES) and report.funding_usd == Decimal("-0.5")
    assert report.best_trade.pnl_usd == 400 and report.worst_trade.pnl_usd == -300

    strategies = {g.key: g for g in report.by_strategy}
    assert [g.key for g in report.by_strategy] == ["trend_pullback", "range_fade", "breakout"]  # best first
    breakout = strategies["breakout"]
    assert (breakout.trades, breakout.losses, breakout.pnl_usd) == (2, 2, -350)
    assert strategies["trend_pullback"].win_rate == 1 and strategies["trend_pullback"].avg_duration_seconds == 7200
    reasons = {g.key: (g.trades, g.pnl_usd, g.fees_usd) for g in report.by_exit_reason}
    assert reasons == {"take_profit": (2, 500, Decimal("2.5")), "stop_loss": (2, -350, Decimal("2.5")),
                       "signal": (1, 0, Decimal("0.25"))}
    assert [(g.key, g.trades, g.pnl_usd) for g in report.by_day] == [
        ("2025-01-01", 1, 100), ("2025-01-02", 2, -350), ("2025-01-04", 1, 400), ("2025-02-01", 1, 0)]
    assert [(g.key, g.trades, g.pnl_usd) for g in report.by_month] == [("2025-01", 4, 150), ("2025-02", 1, 0)]
    assert [(g.key, g.trades) for g in report.by_instrument] == [("BTC-USDT-SWAP", 5)]

    # Equity after each close; the deepest fall is from the first close's peak to the third close.
    equity = [Decimal(10000)]
    for p in pnls:
        equity.append(equity[-1] + p)
    assert [pt.equity for pt in report.equity_curve] == equity
    assert [pt.ts for pt in report.equity_curve] == [T0, *(c[0] for c in CLOSES)]
    dd = report.max_drawdown
    assert dd.pct == Decimal(350) / Decimal(10100) and dd.usd == 350
    assert (dd.peak_at, dd.trough_at) == (CLOSES[0][0], CLOSES[2][0])

    daily = _daily_returns(T0, END, [(c[0], c[1]) for c in CLOSES], Decimal(10000))
    assert len(daily) == 33  # Jan 1 .. Feb 2, every day counted
    assert report.sharpe == round(statistics.mean(daily) / statistics.stdev(daily) * math.sqrt(365), 4)
    downside = math.sqrt(sum(min(r, 0) ** 2 for r in daily) / len(daily))
    assert report.sortino == round(statistics.mean(daily) / downside * math.sqrt(365), 4)
    assert report.calmar == round(0.015 * 365 / 32 / float(Decimal(350) / Decimal(10100)), 4)

    # No candles stored: buy-and-hold from the prices the first and last cycles saw.
    bh = report.buy_and_hold
    assert (bh.start_price, bh.end_price, bh.source) == (100, 120, "cycle snapshots")
    assert bh.return_pct == Decimal("0.2") and bh.pnl_usd == Decimal("2000")


@pytest.mark.django_db
def test_buy_and_hold_comes_from_the_finest_stored_candles_of_the_period(journal_rows: Instrument) -> None:
    def bars(tf: str, step: timedelta, first_open: str, last_close: str) -> None:
        ts, rows = T0, []
        while ts + step <= END:
            rows.append(Candle(instrument=journal_rows, timeframe=tf, ts=ts, open=Decimal("50"), high=Decimal("60"),
                               low=Decimal("40"), close=Decimal("55"), volume=Decimal("1")))
            ts += step
        rows[0].open, rows[-1].close = Decimal(first_open), Decimal(last_close)
        Candle.objects.bulk_create(rows)
        # A bar that opens before the period and one that closes after it are not part of it.
        Candle.objects.create(instrument=journal_rows, timeframe=tf, ts=T0 - step, open=1, high=1, low=1, close=1,
                              volume=1)
        Candle.objects.create(instrument=journal_rows, timeframe=tf, ts=END, open=1, high=1, low=1, close=1, volume=1)

    bars("4H", timedelta(hours=4), "90", "99")
    bars("1H", timedelta(hours=1), "80", "100")
    bh = run_report(mode=Mode.REPLAY, run_id=RUN).buy_and_hold
    assert (bh.start_price, bh.end_price, bh.source) == (80, 100, "candles 1H")
    assert bh.return_pct == Decimal("0.25") and bh.pnl_usd == Decimal("2500")


@pytest.mark.django_db
def test_a_period_counts_what_closed_before_it_in_the_starting_balance(journal_rows: Instrument) -> None:
    since, until = T0 + timedelta(days=1), T0 + timedelta(days=3)
    report = run_report(mode=Mode.REPLAY, run_id=RUN, since=since, until=until)
    assert (report.start, report.end) == (since, until)
    assert report.starting_balance == Decimal("10100")  # the first trade closed before the period
    assert [t.pnl_usd for t in report.trades] == [-300, -50] and report.pnl_usd == -350
    assert report.final_balance == Decimal("9750") and report.max_drawdown.pct == Decimal(350) / Decimal(10100)
    assert report.buy_and_hold.source == "cycle snapshots" and report.buy_and_hold.end_price == 120


@pytest.mark.django_db
def test_the_live_report_holds_only_the_live_rows(journal_rows: Instrument) -> None:
    report = run_report(mode=Mode.LIVE, run_id=None, inst_id="BTC-USDT-SWAP")
    assert [t.pnl_usd for t in report.trades] == [-999] and report.run_id == ""


@pytest.mark.django_db
@pytest.mark.parametrize(("kwargs", "says"), [
    (dict(mode="paper", run_id=None), "unknown mode 'paper'"),
    (dict(mode=Mode.REPLAY, run_id=None), "a replay report needs a run id"),
    (dict(mode=Mode.REPLAY, run_id="replay-nope"), "no run 'replay-nope'"),
    (dict(mode=Mode.REPLAY, run_id=RUN, inst_id="DOGE-USDT-SWAP"), "unknown instrument 'DOGE-USDT-SWAP'"),
    (dict(mode=Mode.REPLAY, run_id=RUN, since=END, until=T0), "the period is empty"),
])
def test_bad_arguments_are_a_report_error_that_says_what_is_wrong(journal_rows: Instrument, kwargs: dict,
                                                                   says: str) -> None:
    with pytest.raises(ReportError, match=says):
        run_report(**kwargs)


@pytest.mark.django_db
def test_the_report_reads_a_fixed_number_of_queries_whatever_the_trade_count(journal_rows: Instrument) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as seen:
            run_report(mode=Mode.REPLAY, run_id=RUN)
        return len(seen.captured_queries)

    before = queries()
    for i in range(40):
        at = T0 + timedelta(days=10, hours=i)
        _trade(journal_rows, opened_at=at, closed_at=at + timedelta(minutes=30), pnl=Decimal(i - 20))
    assert queries() == before <= 12


@pytest.mark.django_db
def test_the_trades_csv_holds_every_trade_of_the_report_exactly(journal_rows: Instrument) -> None:
    report = run_report(mode=Mode.REPLAY, run_id=RUN)
    out = StringIO()
    assert trades_csv(report, out) == 6
    rows = list(csv.DictReader(StringIO(out.getvalue())))
    stored = list(Trade.objects.filter(run_id=RUN).order_by("opened_at", "id"))
    assert [int(r["id"]) for r in rows] == [t.id for t in stored]
    for row, trade in zip(rows, stored, strict=True):
        assert Decimal(row["entry_price"]) == trade.entry_price and row["strategy"] == trade.strategy_used
        assert (Decimal(row["pnl_usd"]) if row["pnl_usd"] else None) == trade.pnl_usd
        assert row["closed_at"] == (trade.closed_at.isoformat() if trade.closed_at else "")


@pytest.mark.django_db
def test_the_text_report_has_every_section_and_the_figures(journal_rows: Instrument) -> None:
    text = "\n".join(report_lines(run_report(mode=Mode.REPLAY, run_id=RUN)))
    for section in ("TRADES", "RESULTS PER INSTRUMENT", "RESULTS PER STRATEGY", "RESULTS PER EXIT REASON",
                    "RESULTS PER DAY", "RESULTS PER MONTH", "SUMMARY"):
        assert f"==== {section}" in text
    assert "10,150.00 USDT" in text and "2025-01-01 10:00 -> 2025-01-02 18:00" in text  # final balance, drawdown
    assert "20.00% (2,000.00 USDT) BTC-USDT-SWAP 100 -> 120 (cycle snapshots)" in text
