"""The frozen market snapshot: what the brain sees of one instrument at one time.

The snapshot is built by `market.snapshot.snapshot_build` and is the only
market input of the screener, the analyst and the rules brain; it is stored as
JSON on the cycle. Indicator values are floats (analytics) or `None` when there
is too little history: never NaN. Prices the exchange quotes are Decimal.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

Regime = Literal["trending_up", "trending_down", "volatile", "ranging", "unknown"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IndicatorSet(_Frozen):
    """One timeframe's indicators at the last closed candle."""

    close: float | None = None
    rsi_14: float | None = None
    macd: float | None = None
    macd_signal_line: float | None = None
    macd_hist: float | None = None
    bb_upper: float | None = None
    bb_middle: float | None = None
    bb_lower: float | None = None
    ema_20: float | None = None
    ema_50: float | None = None
    ema_200: float | None = None
    atr_14: float | None = None
    atr_ratio: float | None = None  # ATR(14) / its 50-bar mean: the regime's volatility measure
    vwap: float | None = None
    adx_14: float | None = None
    plus_di: float | None = None
    minus_di: float | None = None
    stochrsi_k: float | None = None
    stochrsi_d: float | None = None
    obv: float | None = None
    ichimoku_tenkan: float | None = None
    ichimoku_kijun: float | None = None
    ichimoku_senkou_a: float | None = None
    ichimoku_senkou_b: float | None = None
    pivot: float | None = None
    support: tuple[float, ...] = ()
    resistance: tuple[float, ...] = ()
    vp_poc: float | None = None
    vp_vah: float | None = None
    vp_val: float | None = None
    ema20_slope: float | None = None  # EMA20 change over the last 5 bars, relative
    # Derived signals
    bb_position: float | None = None  # 0 = lower band, 1 = upper band
    ema_alignment: Literal["bullish", "bearish", "mixed"] | None = None
    macd_signal: Literal["cross_up", "cross_down", "none"] | None = None
    volume_vs_avg: float | None = None  # last volume / 20-bar mean

    @field_validator("*", mode="before")
    @classmethod
    def _no_nan(cls, value: object) -> object:
        # NaN and infinities never reach a snapshot: they become None.
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            return None
        return value


class CandleView(_Frozen):
    ts: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


class TimeframeView(_Frozen):
    timeframe: str
    candles_used: int
    last_closed_ts: datetime | None
    indicators: IndicatorSet
    regime: Regime
    recent_candles: tuple[CandleView, ...] = ()


class BookView(_Frozen):
    bids: tuple[tuple[Decimal, Decimal], ...] = ()  # (price, size), best first
    asks: tuple[tuple[Decimal, Decimal], ...] = ()
    imbalance: float | None = None  # (bid size - ask size) / (bid size + ask size), top 5
    spread: Decimal | None = None


class TickerView(_Frozen):
    last: Decimal
    bid: Decimal | None = None
    ask: Decimal | None = None
    mark: Decimal | None = None
    high_24h: Decimal | None = None
    low_24h: Decimal | None = None
    volume_24h: Decimal | None = None
    change_24h_pct: float | None = None


class Anomalies(_Frozen):
    move_1h: bool = False  # |1H change| > ANOMALY_MOVE_1H_PCT
    funding_spike: bool = False  # funding > FUNDING_SPIKE_HIGH or < FUNDING_SPIKE_LOW
    oi_change_4h: bool = False  # |OI change over 4H| > OI_CHANGE_4H_PCT
    reasons: tuple[str, ...] = ()

    @property
    def any(self) -> bool:
        return self.move_1h or self.funding_spike or self.oi_change_4h


class MarketSnapshot(_Frozen):
    inst_id: str
    ts: datetime  # as-of time (aware UTC): nothing in here closed after it
    source: str  # the feed's name: okx, replay, synthetic
    price: Decimal
    ticker: TickerView
    timeframes: dict[str, TimeframeView]
    order_book: BookView | None = None
    funding_rate: Decimal | None = None
    next_funding_time: datetime | None = None
    open_interest: Decimal | None = None
    oi_change_4h_pct: float | None = None
    price_change_1h_pct: float | None = None
    regime: Regime = "unknown"  # the 1H regime, the one the playbook's rules key on
    anomalies: Anomalies = Anomalies()

    def to_json(self) -> str:
        return self.model_dump_json()

    def as_jsonable(self) -> dict[str, object]:
        return self.model_dump(mode="json")
