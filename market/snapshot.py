"""The market snapshot of one instrument at one time (`MarketSnapshot`).

`snapshot_build` reads a feed (live, replay or synthetic); `snapshot_from_frames`
is the pure part, which the replay loop calls with candle frames and
indicators precomputed once over its whole history.

Definitions (all ratios are fractions, like the settings: 0.03 = 3%):
- per timeframe: the last `INDICATOR_HISTORY_CANDLES` candles closed by `as_of`
  (open time + timeframe <= as_of), their indicators at the last one, the regime,
  the last `SNAPSHOT_RECENT_CANDLES` candles;
- price = ticker last, else the last close of the finest timeframe;
- price_change_1h_pct = price / C - 1, C = the close of the finest candle
  (15m, else 1H) that closed at or before as_of - 1 h;
- order book: top 5; imbalance = (sum bid sizes - sum ask sizes) / (sum of
  both); spread = best ask - best bid; None when the feed has no book;
- oi_change_4h_pct = OI / OI 4 h earlier - 1, in contracts. The earlier value
  comes from the feed's `open_interest_at(inst_id, when)` when it has one
  (replay, synthetic); OKX's public REST has no point-in-time OI, so live it is
  None (and so is the OI anomaly);
- regime = the 1H regime; anomalies from ANOMALY_MOVE_1H_PCT, FUNDING_SPIKE_HIGH
  / FUNDING_SPIKE_LOW and OI_CHANGE_4H_PCT, each with its reason.

Replay equivalence rule: the live snapshot computes indicators over the
trailing window W (= INDICATOR_HISTORY_CANDLES). Given indicators precomputed
over a longer history (`computed`, made by `indicators_compute` with the same
`profile_bars`), the row at t equals the trailing-window computation within
1e-9 relative for every column except `indicators.WINDOW_DEPENDENT` once
W >= `indicators.CONVERGED_AFTER_BARS`: those (EMA200, its alignment, OBV)
are recomputed here on the trailing window. With a shorter W, or when t is
not in `computed`, the whole trailing window is computed (exact by definition).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import compress
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from django.conf import settings

from market import indicator_kernels as k
from market.feeds.base import Bar, FeedError, FundingRate, MarketFeed, OpenInterest, OrderBook, Ticker
from market.indicators import (
    CONVERGED_AFTER_BARS,
    OHLCV,
    ema_alignment_code,
    indicator_set_at,
    indicator_set_from_finite,
    indicators_compute,
)
from market.regime import regime_detect
from market.schemas import (
    Anomalies,
    BookView,
    CandleView,
    IndicatorSet,
    MarketSnapshot,
    TickerView,
    TimeframeView,
)
import structlog

log = structlog.get_logger(__name__)
T = TypeVar("T")

TIMEFRAME_DURATIONS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1), "3m": timedelta(minutes=3), "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15), "30m": timedelta(minutes=30), "1H": timedelta(hours=1),
    "2H": timedelta(hours=2), "4H": timedelta(hours=4), "6H": timedelta(hours=6),
    "12H": timedelta(hours=12), "1D": timedelta(days=1),
}
BOOK_DEPTH = 5


class SnapshotUnavailable(Exception):
    """Not even a price is known for the instrument: no snapshot can be built."""


def tf_duration(timeframe: str) -> timedelta:
    try:
        return TIMEFRAME_DURATIONS[timeframe]
    except KeyError:
        raise ValueError(f"unknown timeframe {timeframe!r}; known: {', '.join(TIMEFRAME_DURATIONS)}") from None


def _dec(x: float) -> Decimal:
    # repr gives the shortest string that round-trips: 66440.5, not 66440.500000000007...
    return Decimal(repr(float(x)))


def bars_to_frame(bars: list[Bar]) -> pd.DataFrame:
    """Confirmed bars as the candle frame indicators take (float OHLCV, UTC open-time index)."""
    bars = [b for b in bars if b.confirmed]
    index = pd.DatetimeIndex([b.ts for b in bars], name="ts")
    if index.tz is None:
        index = index.tz_localize("UTC")
    data = {name: np.array([float(getattr(b, name)) for b in bars], dtype=np.float64) for name in OHLCV}
    return pd.DataFrame(data, index=index)


def closed_by(candles: pd.DataFrame, timeframe: str, as_of: datetime) -> pd.DataFrame:
    """The rows of `candles` whose candle closed at or before `as_of` (a slice, no copy)."""
    return candles.iloc[:_closed_end(candles, timeframe, as_of)]


def _indicator_frame(trailing: pd.DataFrame, computed: pd.DataFrame | None, window: int) -> pd.DataFrame:
    """The indicator row of the trailing window's last candle, as a one-row frame."""
    if computed is not None and len(computed):
        t = trailing.index[-1]
        pos = int(computed.index.searchsorted(t))
        if pos < len(computed) and computed.index[pos] == t:
            row = computed.iloc[pos:pos + 1]
            if computed.index[0] == trailing.index[0]:
                return row  # same start, same data: identical by construction
            if computed.index[0] < trailing.index[0] and len(trailing) >= CONVERGED_AFTER_BARS:
                return _with_window_columns(row.copy(), trailing)
    return indicators_compute(trailing, profile_bars=window, tail=1).iloc[-1:]


def _with_window_columns(row: pd.DataFrame, trailing: pd.DataFrame) -> pd.DataFrame:
    close = np.ascontiguousarray(trailing["close"].to_numpy(dtype=np.float64))
    volume = np.ascontiguousarray(trailing["volume"].to_numpy(dtype=np.float64))
    e200 = k.ema(close, 200)[-1:]
    row["ema_200"] = e200
    row["ema_alignment"] = ema_alignment_code(row["ema_20"].to_numpy(), row["ema_50"].to_numpy(), e200)
    row["obv"] = k.obv(close, volume)[-1:]
    return row


def timeframe_view(*, timeframe: str, candles: pd.DataFrame | None, as_of: datetime,
                   computed: pd.DataFrame | None = None, window: int | None = None,
                   recent: int | None = None) -> TimeframeView:
    window = int(window or settings.INDICATOR_HISTORY_CANDLES)
    recent = int(recent or settings.SNAPSHOT_RECENT_CANDLES)
    trailing = closed_by(candles, timeframe, as_of).iloc[-window:] if candles is not None else None
    if trailing is None or trailing.empty:
        return TimeframeView(timeframe=timeframe, candles_used=0, last_closed_ts=None,
                             indicators=IndicatorSet(), regime="unknown")
    indicators = indicator_set_at(_indicator_frame(trailing, computed, window))
    tail = trailing.iloc[-recent:]
    views = tuple(
        CandleView(ts=ts.to_pydatetime(), open=_dec(o), high=_dec(h), low=_dec(lo), close=_dec(c), volume=_dec(v))
        for ts, o, h, lo, c, v in zip(tail.index, tail["open"], tail["high"], tail["low"], tail["close"],
                                      tail["volume"], strict=True)
    )
    return TimeframeView(timeframe=timeframe, candles_used=len(trailing),
                         last_closed_ts=trailing.index[-1].to_pydatetime(), indicators=indicators,
                         regime=regime_detect(indicators), recent_candles=views)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _utc_from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(ns) // 1000)


def epoch_ns(when: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (exact; `pd.Timestamp(when).value` at a tenth of the cost)."""
    return (when - _EPOCH) // _MICROSECOND * 1000


_MICROSECOND = timedelta(microseconds=1)


class TimeframeSeries:
    """One timeframe's candles and indicators over a whole history, viewed at any point (the replay).

    `view(end)` is `timeframe_view` at a time when exactly `end` candles had
    closed, equal to it field for field, without pandas on the way: the
    indicator block is a numpy array, and the window-dependent columns (EMA200,
    its alignment, OBV over the trailing window) are computed for every bar at
    once by the same kernels a live snapshot runs on its own window. When that
    shortcut does not apply (indicators not computed over these very candles,
    or a window shorter than CONVERGED_AFTER_BARS) it calls `timeframe_view`.
    """

    def __init__(self, *, timeframe: str, candles: pd.DataFrame | None, computed: pd.DataFrame | None,
                 window: int, recent: int) -> None:
        self.timeframe, self.candles, self.computed = timeframe, candles, computed
        self.window, self.recent = window, recent
        # The recent-candle views last made, from row `first` on: consecutive views share all but
        # one of them (frozen models, so sharing is safe).
        self._recent_made: tuple[int, tuple[CandleView, ...]] = (0, ())
        self.open_ns = candles.index.asi8 if candles is not None else np.zeros(0, dtype=np.int64)
        self.close = candles["close"].to_numpy() if candles is not None and len(candles) else np.zeros(0)
        self.duration_ns = tf_duration(timeframe) // _MICROSECOND * 1000
        self.fast = (candles is not None and computed is not None and window >= CONVERGED_AFTER_BARS
                     and computed.index.equals(candles.index))
        if not self.fast:
            return
        assert candles is not None and computed is not None
        self.ohlcv = np.ascontiguousarray(candles[list(OHLCV)].to_numpy(dtype=np.float64))
        block = computed.to_numpy(dtype=np.float64, copy=True)
        self.columns = list(computed.columns)
        col = self.columns.index
        close, volume = np.ascontiguousarray(self.ohlcv[:, 3]), np.ascontiguousarray(self.ohlcv[:, 4])
        e200, obv = k.trailing_ema_obv(close, volume, window, 200)
        # Rows whose trailing window starts after the first candle take the window's own values
        # (the others ARE the whole history: their computed row is already the window's).
        later = np.arange(len(block)) >= window
        block[later, col("ema_200")] = e200[later]
        block[later, col("obv")] = obv[later]
        block[later, col("ema_alignment")] = ema_alignment_code(
            block[later, col("ema_20")], block[later, col("ema_50")], e200[later])
        self.rows = block
        self.finite = np.isfinite(block)

    def _candle_view(self, i: int) -> CandleView:
        o, h, lo, c, v = self.ohlcv[i].tolist()
        return CandleView(ts=_utc_from_ns(self.open_ns[i]), open=_dec(o), high=_dec(h), low=_dec(lo), close=_dec(c),
                          volume=_dec(v))

    def _recent_views(self, first: int, end: int) -> tuple[CandleView, ...]:
        """The views of rows [first, end), reusing those of the last call's rows."""
        made_first, made = self._recent_made
        made_end = made_first + len(made)
        if made_first <= first <= made_end:
            views = made[first - made_first:end - made_first] + tuple(
                self._candle_view(i) for i in range(max(first, made_end), end))
        else:
            views = tuple(self._candle_view(i) for i in range(first, end))
        self._recent_made = (first, views)
        return views

    def closed_count(self, as_of: datetime) -> int:
        """How many candles had closed by `as_of` (open time + timeframe <= as_of)."""
        return self.closed_count_ns(epoch_ns(as_of))

    def closed_count_ns(self, as_of_ns: int) -> int:
        """`closed_count` of the time `as_of_ns` nanoseconds after the epoch (`epoch_ns`)."""
        return int(self.open_ns.searchsorted(as_of_ns - self.duration_ns, side="right"))

    def view(self, end: int, as_of: datetime) -> TimeframeView:
        """The view when the first `end` candles had closed (`as_of` is any time in that state)."""
        if not self.fast:
            return timeframe_view(timeframe=self.timeframe, candles=self.candles, as_of=as_of, computed=self.computed,
                                  window=self.window, recent=self.recent)
        if end <= 0:
            return TimeframeView(timeframe=self.timeframe, candles_used=0, last_closed_ts=None,
                                 indicators=IndicatorSet(), regime="unknown")
        start = max(0, end - self.window)
        # The row's finite values (what `indicator_set_from_row` keeps of it), picked out by numpy.
        row = zip(self.columns, self.rows[end - 1].tolist(), strict=True)
        indicators = indicator_set_from_finite(dict(compress(row, self.finite[end - 1].tolist())))
        first = max(start, end - self.recent)
        views = self._recent_views(first, end)
        return TimeframeView(timeframe=self.timeframe, candles_used=end - start,
                             last_closed_ts=_utc_from_ns(self.open_ns[end - 1]), indicators=indicators,
                             regime=regime_detect(indicators), recent_candles=views)


def ticker_view(ticker: Ticker) -> TickerView:
    change = None
    if ticker.open_24h is not None and ticker.open_24h != 0:
        change = float(ticker.last / ticker.open_24h - 1)
    return TickerView(last=ticker.last, bid=ticker.bid, ask=ticker.ask, mark=ticker.mark,
                      high_24h=ticker.high_24h, low_24h=ticker.low_24h, volume_24h=ticker.volume_24h,
                      change_24h_pct=change)


def book_view(book: OrderBook, depth: int = BOOK_DEPTH) -> BookView | None:
    bids, asks = book.bids[:depth], book.asks[:depth]
    if not bids and not asks:
        return None
    bid_size = sum((level.size for level in bids), Decimal(0))
    ask_size = sum((level.size for level in asks), Decimal(0))
    total = bid_size + ask_size
    return BookView(
        bids=tuple((level.price, level.size) for level in bids),
        asks=tuple((level.price, level.size) for level in asks),
        imbalance=float((bid_size - ask_size) / total) if total > 0 else None,
        spread=asks[0].price - bids[0].price if bids and asks else None,
    )


def _closed_end(frame: pd.DataFrame, timeframe: str, as_of: datetime) -> int:
    """The number of rows of `frame` whose candle closed by `as_of` (`len(closed_by(...))`, without the slice)."""
    if not len(frame):
        return 0
    return int(frame.index.asi8.searchsorted(epoch_ns(as_of - tf_duration(timeframe)), side="right"))


def price_change_1h(*, price: Decimal, candles: Mapping[str, pd.DataFrame | None], as_of: datetime,
                    series: Mapping[str, TimeframeSeries] | None = None) -> float | None:
    """`series[tf]`, when given, is the replay's `TimeframeSeries` of the very frame `candles[tf]`: read its arrays."""
    for timeframe in ("15m", "1H"):
        found = _opens_and_closes(timeframe, candles, series)
        if found is None:
            continue
        open_ns, close = found
        end = int(open_ns.searchsorted(epoch_ns(as_of - _HOUR - tf_duration(timeframe)), side="right"))
        if end == 0:
            return None
        base = float(close[end - 1])
        return float(price) / base - 1 if base > 0 else None
    return None


def _opens_and_closes(timeframe: str, candles: Mapping[str, pd.DataFrame | None],
                      series: Mapping[str, TimeframeSeries] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(open times in ns, closes) of a timeframe's candles, None when it has none (`frame.empty`)."""
    known = series.get(timeframe) if series is not None else None
    if known is not None:  # the replay's arrays of the same frame: no pandas
        return (known.open_ns, known.close) if len(known.open_ns) else None
    frame = candles.get(timeframe)
    if frame is None or 0 in frame.shape:  # frame.empty, without its walk over the axes
        return None
    return frame.index.asi8, frame["close"].to_numpy()


_HOUR = timedelta(hours=1)
# What nearly every cycle finds (built like anomalies_detect builds it: every field given).
_NO_ANOMALIES = Anomalies(move_1h=False, funding_spike=False, oi_change_4h=False, reasons=())


def anomalies_detect(*, price_change_1h_pct: float | None, funding_rate: Decimal | None,
                     oi_change_4h_pct: float | None) -> Anomalies:
    reasons: list[str] = []
    move = price_change_1h_pct is not None and abs(price_change_1h_pct) > float(settings.ANOMALY_MOVE_1H_PCT)
    if move:
        reasons.append(f"1H move {price_change_1h_pct:+.2%} beyond ±{float(settings.ANOMALY_MOVE_1H_PCT):.2%}")
    spike = False
    if funding_rate is not None:
        if funding_rate > settings.FUNDING_SPIKE_HIGH:
            spike = True
            reasons.append(f"funding {float(funding_rate):+.4%} above {float(settings.FUNDING_SPIKE_HIGH):+.4%}")
        elif funding_rate < settings.FUNDING_SPIKE_LOW:
            spike = True
            reasons.append(f"funding {float(funding_rate):+.4%} below {float(settings.FUNDING_SPIKE_LOW):+.4%}")
    oi = oi_change_4h_pct is not None and abs(oi_change_4h_pct) > float(settings.OI_CHANGE_4H_PCT)
    if oi:
        reasons.append(f"open interest {oi_change_4h_pct:+.2%} in 4H beyond ±{float(settings.OI_CHANGE_4H_PCT):.2%}")
    if not reasons:  # the frozen model with nothing found, shared: equal to a new one, at no cost
        return _NO_ANOMALIES
    return Anomalies(move_1h=move, funding_spike=spike, oi_change_4h=oi, reasons=tuple(reasons))


def snapshot_from_frames(*, inst_id: str, as_of: datetime, source: str,
                         candles: Mapping[str, pd.DataFrame | None],
                         computed: Mapping[str, pd.DataFrame] | None = None,
                         ticker: Ticker | None = None, order_book: OrderBook | None = None,
                         funding: FundingRate | None = None, open_interest: OpenInterest | None = None,
                         open_interest_4h_ago: Decimal | None = None,
                         window: int | None = None, recent: int | None = None,
                         views: Mapping[str, TimeframeView] | None = None,
                         series: Mapping[str, TimeframeSeries] | None = None) -> MarketSnapshot:
    """Build the snapshot from candle frames (any history; only bars closed by `as_of` are used).

    `computed[tf]`, when given, is `indicators_compute` over `candles[tf]` (see
    the module docstring for when its rows are used as they are).
    `views[tf]`, when given, is `timeframe_view` of that timeframe at `as_of` (same candles,
    same arguments) made by the caller: the replay reuses a 1H view for the twelve 5-minute
    cycles in which no new 1H candle closes.
    `series[tf]`, when given, is the replay's `TimeframeSeries` over `candles[tf]` (the same
    frame): the 1H price change reads its arrays instead of asking pandas.
    Raises SnapshotUnavailable when there is neither a ticker nor a closed candle.
    """
    if as_of.tzinfo is None:
        raise ValueError("as_of must be timezone-aware (UTC)")
    computed = computed or {}
    given = views or {}
    views = {
        tf: given[tf] if tf in given else timeframe_view(
            timeframe=tf, candles=candles.get(tf), as_of=as_of, computed=computed.get(tf), window=window, recent=recent)
        for tf in candles
    }
    if ticker is not None:
        tview = ticker_view(ticker)
    else:
        last = _last_close(candles, as_of)
        if last is None:
            raise SnapshotUnavailable(f"no ticker and no closed candle for {inst_id} at {as_of.isoformat()}")
        tview = TickerView(last=last)
    price = tview.last
    change_1h = price_change_1h(price=price, candles=candles, as_of=as_of, series=series)
    rate = funding.rate if funding is not None else None
    oi_now = open_interest.oi_contracts if open_interest is not None else None
    oi_change = None
    if oi_now is not None and open_interest_4h_ago is not None and open_interest_4h_ago > 0:
        oi_change = float(oi_now / open_interest_4h_ago - 1)
    hourly = views.get("1H")
    return MarketSnapshot(
        inst_id=inst_id,
        ts=as_of,
        source=source,
        price=price,
        ticker=tview,
        timeframes=views,
        order_book=book_view(order_book) if order_book is not None else None,
        funding_rate=rate,
        next_funding_time=funding.next_funding_time if funding is not None else None,
        open_interest=oi_now,
        oi_change_4h_pct=oi_change,
        price_change_1h_pct=change_1h,
        regime=hourly.regime if hourly is not None else "unknown",
        anomalies=anomalies_detect(price_change_1h_pct=change_1h, funding_rate=rate, oi_change_4h_pct=oi_change),
    )


def _last_close(candles: Mapping[str, pd.DataFrame | None], as_of: datetime) -> Decimal | None:
    best: tuple[pd.Timestamp, float] | None = None
    for tf, frame in candles.items():
        if frame is None:
            continue
        end = _closed_end(frame, tf, as_of)
        if end == 0:
            continue
        close_time = frame.index[end - 1] + pd.Timedelta(tf_duration(tf))
        if best is None or close_time > best[0]:
            best = (close_time, float(frame["close"].to_numpy()[end - 1]))
    return _dec(best[1]) if best is not None else None


def _optional(what: str, inst_id: str, fn: Callable[[], T]) -> T | None:
    """An optional part of the snapshot: a feed error degrades it to None, logged."""
    try:
        return fn()
    except FeedError as e:
        log.warning("snapshot.part_missing", part=what, inst_id=inst_id, error=str(e), retryable=e.retryable)
        return None


def _candles_from_feed(feed: MarketFeed, inst_id: str, timeframe: str, *, limit: int,
                       as_of: datetime | None) -> pd.DataFrame | None:
    # Bars opening before `before` close by as_of; one extra covers a still-open bar.
    before = as_of - tf_duration(timeframe) + timedelta(milliseconds=1) if as_of is not None else None
    frame_fn: Any = getattr(feed, "frame", None)
    if callable(frame_fn):
        return frame_fn(inst_id, timeframe, limit=limit + 1, before=before)
    return bars_to_frame(feed.candles(inst_id, timeframe, limit=limit + 1, before=before))


def snapshot_build(*, feed: MarketFeed, inst_id: str, as_of: datetime | None = None) -> MarketSnapshot:
    """Read the feed and build the snapshot of `inst_id` at `as_of` (default: the feed's clock).

    Missing candles for a timeframe leave its indicators None; book, funding and
    open interest degrade to None on a feed error (logged). The ticker falls back
    to the last close; with neither, SnapshotUnavailable.
    """
    as_of = as_of or feed.now()
    window = int(settings.INDICATOR_HISTORY_CANDLES)
    candles: dict[str, pd.DataFrame | None] = {}
    for tf in settings.TIMEFRAMES:
        candles[tf] = _optional(f"candles {tf}", inst_id,
                                lambda tf=tf: _candles_from_feed(feed, inst_id, tf, limit=window, as_of=as_of))
    ticker = _optional("ticker", inst_id, lambda: feed.ticker(inst_id))
    book = _optional("order book", inst_id, lambda: feed.order_book(inst_id, BOOK_DEPTH))
    funding = _optional("funding rate", inst_id, lambda: feed.funding_rate(inst_id))
    oi = _optional("open interest", inst_id, lambda: feed.open_interest(inst_id))
    oi_ago = None
    history: Any = getattr(feed, "open_interest_at", None)
    if oi is not None and callable(history):
        oi_ago = _optional("open interest 4h ago", inst_id, lambda: history(inst_id, as_of - timedelta(hours=4)))
    return snapshot_from_frames(
        inst_id=inst_id, as_of=as_of, source=getattr(feed, "name", type(feed).__name__), candles=candles,
        ticker=ticker, order_book=book, funding=funding, open_interest=oi, open_interest_4h_ago=oi_ago,
        window=window,
    )
