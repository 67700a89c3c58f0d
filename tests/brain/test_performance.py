"""Performance metrics, checked against figures computed by hand."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from brain.performance import (
    INFINITY,
    TradeRecord,
    max_drawdown,
    performance_summarize,
    summary_as_dict,
)

T0 = datetime(2026, 3, 2, 0, 0, tzinfo=timezone.utc)
D = Decimal


def trade(i: int, pnl: str, *, hour: int = 0, strategy: str = "trend_pullback", regime: str = "trending_up",
          confidence: str | None = "0.65") -> TradeRecord:
    opened = T0 + timedelta(days=i, hours=hour)
    return TradeRecord(id=i, pnl_usd=D(pnl), opened_at=opened, closed_at=opened + timedelta(minutes=30),
                       strategy=strategy, regime=regime, confidence=D(confidence) if confidence else None)


# PnL sequence: +100, -50, -30, +20, 0, +60, -100
# wins 3 (100, 20, 60), losses 3 (-50, -30, -100), breakeven 1
# gross profit 180, gross loss 180 -> profit factor 1; total 0
# cumulative: 100, 50, 20, 40, 40, 100, 0 -> peak 100, max fall 100
SEQUENCE = ["100", "-50", "-30", "20", "0", "60", "-100"]


def test_it_computes_the_headline_figures_by_hand() -> None:
    s = performance_summarize([trade(i, p) for i, p in enumerate(SEQUENCE, start=1)])
    assert (s.total_trades, s.wins, s.losses, s.breakeven) == (7, 3, 3, 1)
    assert s.win_rate == D(3) / D(7)
    assert s.avg_win == D(60)
    assert s.avg_loss == D(-60)
    assert s.gross_profit == D(180) and s.gross_loss == D(180)
    assert s.profit_factor == D(1)
    assert s.total_pnl == D(0)
    assert s.max_consecutive_wins == 1  # the breakeven between +20 and +60 ends the streak
    assert s.max_consecutive_losses == 2
    assert s.max_drawdown_usd == D(100)
    assert s.max_drawdown_pct is None  # no starting equity given
    assert (s.first_trade_id, s.last_trade_id) == (1, 7)


def test_sharpe_is_per_trade_mean_over_sample_stdev() -> None:
    # pnls 10, 20, 30: mean 20, sample variance (100 + 0 + 100) / 2 = 100, stdev 10 -> 2
    s = performance_summarize([trade(1, "10"), trade(2, "20"), trade(3, "30")])
    assert s.sharpe_ratio == D(2)
    assert performance_summarize([trade(1, "10")]).sharpe_ratio is None
    assert performance_summarize([trade(1, "10"), trade(2, "10")]).sharpe_ratio is None


def test_profit_factor_edges() -> None:
    assert performance_summarize([]).profit_factor is None
    assert performance_summarize([trade(1, "5")]).profit_factor == INFINITY
    assert performance_summarize([trade(1, "-5")]).profit_factor == D(0)
    empty = performance_summarize([])
    assert empty.total_trades == 0 and empty.win_rate is None and empty.total_pnl == 0


def test_drawdown_as_a_fraction_of_peak_equity() -> None:
    # equity 1000 -> 1100 (peak) -> 990 -> 1045: fall 110 from 1100 = 0.1
    usd, pct = max_drawdown([D(100), D(-110), D(55)], starting_equity=D(1000))
    assert usd == D(110)
    assert pct == D("0.1")


def test_trades_are_ordered_by_close_time_before_streaks_and_drawdown() -> None:
    rows = [trade(i, p) for i, p in enumerate(SEQUENCE, start=1)]
    shuffled = list(reversed(rows))
    assert performance_summarize(shuffled) == performance_summarize(rows)


def test_breakdowns_by_strategy_regime_and_opening_hour() -> None:
    rows = [
        trade(1, "40", strategy="trend_pullback", regime="trending_up", hour=9),
        trade(2, "-10", strategy="trend_pullback", regime="ranging", hour=9),
        trade(3, "-30", strategy="range_reversion", regime="ranging", hour=14),
        trade(4, "-20", strategy="range_reversion", regime="ranging", hour=14),
    ]
    s = performance_summarize(rows)
    assert list(s.by_strategy) == ["range_reversion", "trend_pullback"]
    trend = s.by_strategy["trend_pullback"]
    assert (trend.trades, trend.wins, trend.losses, trend.total_pnl, trend.profit_factor) == (2, 1, 1, D(30), D(4))
    rr = s.by_strategy["range_reversion"]
    assert (rr.trades, rr.wins, rr.win_rate, rr.total_pnl, rr.avg_pnl, rr.profit_factor) == (2, 0, D(0), D(-50), D(-25), D(0))
    assert s.by_regime["ranging"].trades == 3 and s.by_regime["ranging"].total_pnl == D(-60)
    assert set(s.by_hour) == {9, 14}
    assert s.by_hour[9].total_pnl == D(30)


def test_confidence_calibration_buckets() -> None:
    rows = [
        trade(1, "10", confidence="0.55"),
        trade(2, "-10", confidence="0.59"),
        trade(3, "10", confidence="0.6"),  # lower edge belongs to 0.6-0.7
        trade(4, "-5", confidence="0.85"),
        trade(5, "-5", confidence="0.95"),
        trade(6, "7", confidence="1.0"),  # the top bucket includes 1.0
        trade(7, "7", confidence=None),  # no stated confidence: not calibrated
    ]
    cal = performance_summarize(rows).confidence_calibration
    assert list(cal) == ["0.5-0.6", "0.6-0.7", "0.8-0.9", "0.9-1.0"]
    assert cal["0.5-0.6"].trades == 2 and cal["0.5-0.6"].realised_win_rate == D("0.5")
    assert cal["0.5-0.6"].stated_confidence == D("0.57")
    assert cal["0.6-0.7"].realised_win_rate == D(1)
    assert cal["0.8-0.9"].gap == D("0.85")  # stated 0.85, won none: over-confident
    assert cal["0.9-1.0"].trades == 2 and cal["0.9-1.0"].realised_win_rate == D("0.5")


def test_summary_renders_as_json_ready_strings() -> None:
    d = summary_as_dict(performance_summarize([trade(1, "10"), trade(2, "20")]))
    assert d["profit_factor"] == "Infinity"
    assert d["total_pnl"] == "30"
    assert d["by_hour"]["0"]["trades"] == 2
    import json

    json.dumps(d)


@given(st.lists(st.integers(min_value=-500, max_value=500), max_size=40))
def test_invariants_hold_for_any_sequence(pnls: list[int]) -> None:
    s = performance_summarize([trade(i, str(p)) for i, p in enumerate(pnls, start=1)])
    assert s.wins + s.losses + s.breakeven == s.total_trades == len(pnls)
    assert s.total_pnl == sum(D(p) for p in pnls)
    assert s.gross_profit - s.gross_loss == s.total_pnl
    assert s.max_drawdown_usd >= 0
    assert sum(b.trades for b in s.by_strategy.values()) == len(pnls)
    assert s.max_consecutive_wins <= s.wins and s.max_consecutive_losses <= s.losses
