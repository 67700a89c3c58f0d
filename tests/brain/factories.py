"""Snapshots and contexts for brain tests (plain data, no network)."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from brain.schemas import AccountView, BrainContext, PositionView
from market.schemas import Anomalies, IndicatorSet, MarketSnapshot, TickerView, TimeframeView

NOW = datetime(2026, 2, 2, 12, 0, tzinfo=timezone.utc)


def snapshot(*, price: float = 70000.0, regime: str = "trending_up", m15: dict[str, Any] | None = None,
             h1: dict[str, Any] | None = None, h4: dict[str, Any] | None = None, ts: datetime = NOW,
             funding: str | None = "0.0001", change_1h: float | None = 0.004, oi_change: float | None = 0.02,
             anomalies: Anomalies | None = None, inst_id: str = "BTC-USDT-SWAP") -> MarketSnapshot:
    base15 = dict(close=price, rsi_14=50.0, ema_20=price * 0.999, ema_50=price * 0.995, ema_200=price * 0.98, atr_14=price * 0.002,
                  bb_upper=price * 1.01, bb_middle=price, bb_lower=price * 0.99, bb_position=0.5, macd_hist=1.0,
                  volume_vs_avg=1.0, adx_14=22.0, ema_alignment="bullish", macd_signal="none")
    base1h = dict(close=price, rsi_14=55.0, adx_14=28.0, atr_14=price * 0.006, ema_alignment="bullish", macd_hist=5.0, volume_vs_avg=1.1)
    base4h = dict(close=price, rsi_14=58.0, adx_14=25.0, atr_14=price * 0.012, ema_alignment="bullish")
    views = {}
    for tf, base, extra in (("15m", base15, m15), ("1H", base1h, h1), ("4H", base4h, h4)):
        views[tf] = TimeframeView(timeframe=tf, candles_used=300, last_closed_ts=ts, indicators=IndicatorSet(**{**base, **(extra or {})}),
                                  regime=regime if tf == "1H" else "unknown")
    return MarketSnapshot(
        inst_id=inst_id, ts=ts, source="test", price=Decimal(str(price)),
        ticker=TickerView(last=Decimal(str(price)), bid=Decimal(str(price - 0.1)), ask=Decimal(str(price + 0.1)), change_24h_pct=1.2),
        timeframes=views, funding_rate=Decimal(funding) if funding is not None else None, open_interest=Decimal("25000"),
        oi_change_4h_pct=oi_change, price_change_1h_pct=change_1h, regime=regime, anomalies=anomalies or Anomalies(),
    )


def pullback_long() -> MarketSnapshot:
    """A 1H uptrend with the 15m price back at its EMA20: the trend-pullback long."""
    return snapshot(m15={"rsi_14": 48.0, "ema_20": 69990.0})


def breakout_long() -> MarketSnapshot:
    return snapshot(regime="volatile", m15={"close": 70800.0, "bb_upper": 70700.0, "volume_vs_avg": 2.2, "rsi_14": 68.0, "macd_hist": 12.0})


def range_short() -> MarketSnapshot:
    return snapshot(regime="ranging", h1={"adx_14": 14.0, "ema_alignment": "mixed"},
                    m15={"bb_position": 0.98, "rsi_14": 74.0, "ema_alignment": "mixed"})


def account() -> AccountView:
    return AccountView(equity=Decimal("10000"), available_balance=Decimal("10000"), day_start_equity=Decimal("10000"), peak_equity=Decimal("10000"))


def context(*, positions: list[PositionView] | None = None, manual: bool = False, now: datetime = NOW, trades=None) -> BrainContext:
    return BrainContext(positions=positions or [], account=account(), recent_trades=trades or [], manual_trigger=manual, now=now)


def long_position(strategy: str = "trend_pullback") -> PositionView:
    return PositionView(inst_id="BTC-USDT-SWAP", side="long", size=Decimal("5"), notional_usd=Decimal("350"), entry_price=Decimal("69000"),
                        leverage=Decimal("2"), stop_loss=Decimal("68000"), take_profit=Decimal("71000"), strategy_used=strategy)
