"""The cycle's OKX feed with the stream behind it: what the stream keeps fresh is read locally, the rest over REST.

`stream_feed_for(rest=..., instrument=..., as_of=...)` decides per part, once per COLLECTING:
- candles: from the candle store when the business connection is up (its status written
  within STREAM_FRESH_SECONDS) and, for every timeframe, the store holds the bar that closed
  last before `as_of` and a full indicator window up to it; else REST (`sources["candles"]`
  says which and why). A bar that closed in the last few seconds may still be on its way from
  the stream: we wait up to CANDLE_GRACE_SECONDS for it before falling back;
- ticker, book, funding, open interest: from `LiveMarket` when the public connection is up
  and that part was pushed within STREAM_FRESH_SECONDS of `as_of`; else REST;
- `open_interest_at(inst_id, when)`: the stream's open-interest sample nearest before `when`
  (within OI_SAMPLE_TOLERANCE), which gives the snapshot its live 4-hour OI change and anomaly.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pandas as pd
from django.conf import settings

from market.feeds.base import Bar, BookLevel, FundingRate, OpenInterest, OrderBook, Ticker
from market.models import TIMEFRAME_SECONDS, Candle, Instrument, LiveMarket, OpenInterestSample, StreamStatus
from market.selectors import candles_frame

CANDLE_GRACE_SECONDS = 3.0
OI_SAMPLE_TOLERANCE = timedelta(minutes=15)
WINDOW_SLACK = 0.99  # a few bars OKX itself never had (maintenance) do not make the store "stale"


def stream_up(*, name: str, now: datetime, fresh_seconds: int | None = None) -> str | None:
    """None when the named connection is up and its status is recent; else why not."""
    fresh = timedelta(seconds=fresh_seconds or settings.STREAM_FRESH_SECONDS)
    row = StreamStatus.objects.filter(name=name).first()
    if row is None:
        return f"no {name} stream has run (manage.py stream_okx)"
    if row.stopped or not row.connected:
        return f"the {name} stream is {'stopped' if row.stopped else 'disconnected'}"
    if row.updated_at < now - fresh:
        return f"the {name} stream's status is {(now - row.updated_at).total_seconds():.0f}s old"
    return None


def _floor(when: datetime, seconds: int) -> datetime:
    epoch = int(when.timestamp())
    return datetime.fromtimestamp(epoch - epoch % seconds, tz=when.tzinfo)


def candles_stale_reason(*, instrument: Instrument, timeframes: list[str], as_of: datetime, window: int) -> str | None:
    """None when the store holds, per timeframe, the last bar closed by `as_of` and a full window up to it."""
    for tf in timeframes:
        step = TIMEFRAME_SECONDS[tf]
        last_open = _floor(as_of, step) - timedelta(seconds=step)
        first_open = last_open - timedelta(seconds=step * (window - 1))
        rows = Candle.objects.filter(instrument=instrument, timeframe=tf, confirmed=True, ts__gte=first_open,
                                     ts__lte=last_open)
        if not rows.filter(ts=last_open).exists():
            return f"{tf} bar {last_open:%Y-%m-%d %H:%M} not in the store yet"
        count = rows.count()
        if count < int(window * WINDOW_SLACK):
            return f"{tf}: {count} of {window} bars in the store"
    return None


class StreamFeed:
    """A MarketFeed: each part from the stream's rows when fresh (see `sources`), else from `rest`."""

    name = "okx"

    def __init__(self, *, rest: Any, instrument: Instrument, candles_from_store: bool,
                 live: LiveMarket | None, sources: dict[str, str]) -> None:
        self.rest, self.instrument, self.candles_from_store = rest, instrument, candles_from_store
        self.live, self.sources = live, sources

    def now(self) -> datetime:
        return self.rest.now()

    def instruments(self, inst_type: str = "SWAP") -> Any:
        return self.rest.instruments(inst_type)

    def frame(self, inst_id: str, timeframe: str, *, limit: int, before: datetime | None) -> pd.DataFrame:
        if not self.candles_from_store:
            from market.snapshot import bars_to_frame

            return bars_to_frame(self.rest.candles(inst_id, timeframe, limit=limit, before=before))
        # Bars opening before `before` = bars closed by before - 1 ms + the timeframe (snapshot_build's cursor).
        until = before + timedelta(seconds=TIMEFRAME_SECONDS[timeframe]) - timedelta(milliseconds=1) if before else None
        return candles_frame(instrument=self.instrument, timeframe=timeframe, until=until, limit=limit)

    def candles(self, inst_id: str, timeframe: str, *, limit: int = 300, before: datetime | None = None) -> list[Bar]:
        if not self.candles_from_store:
            return self.rest.candles(inst_id, timeframe, limit=limit, before=before)
        rows = Candle.objects.filter(instrument=self.instrument, timeframe=timeframe, confirmed=True)
        if before is not None:
            rows = rows.filter(ts__lt=before)
        found = list(rows.order_by("-ts")[:limit])
        return [Bar(ts=c.ts, open=c.open, high=c.high, low=c.low, close=c.close, volume=c.volume) for c in reversed(found)]

    def ticker(self, inst_id: str) -> Ticker:
        live = self.live
        if self.sources.get("ticker") != "stream" or live is None or live.last is None or live.ticker_ts is None:
            return self.rest.ticker(inst_id)
        return Ticker(inst_id=inst_id, ts=live.ticker_ts, last=live.last, bid=live.bid, ask=live.ask,
                      open_24h=live.open_24h, high_24h=live.high_24h, low_24h=live.low_24h, volume_24h=live.volume_24h)

    def order_book(self, inst_id: str, depth: int = 5) -> OrderBook:
        live = self.live
        if self.sources.get("book") != "stream" or live is None or not live.book or live.book_ts is None:
            return self.rest.order_book(inst_id, depth)

        def levels(side: str) -> tuple[BookLevel, ...]:
            return tuple(BookLevel(price=Decimal(px), size=Decimal(sz)) for px, sz in (live.book or {}).get(side, [])[:depth])

        return OrderBook(inst_id=inst_id, ts=live.book_ts, bids=levels("bids"), asks=levels("asks"))

    def funding_rate(self, inst_id: str) -> FundingRate:
        live = self.live
        if self.sources.get("funding") != "stream" or live is None or live.funding_ts is None:
            return self.rest.funding_rate(inst_id)
        return FundingRate(inst_id=inst_id, ts=live.funding_ts, rate=live.funding_rate,
                           next_funding_time=live.next_funding_time)

    def open_interest(self, inst_id: str) -> OpenInterest:
        live = self.live
        if self.sources.get("open_interest") != "stream" or live is None or live.oi_ts is None:
            return self.rest.open_interest(inst_id)
        return OpenInterest(inst_id=inst_id, ts=live.oi_ts, oi_contracts=live.oi, oi_ccy=live.oi_ccy, oi_usd=live.oi_usd)

    def open_interest_at(self, inst_id: str, when: datetime) -> Decimal | None:
        """The stream's OI sample nearest before `when` (None when it had none within 15 minutes of it)."""
        row = (OpenInterestSample.objects.filter(instrument=self.instrument, ts__lte=when,
                                                 ts__gte=when - OI_SAMPLE_TOLERANCE)
               .order_by("-ts").values_list("oi", flat=True).first())
        return row


def stream_feed_for(*, rest: Any, instrument: Instrument, as_of: datetime, timeframes: list[str] | None = None,
                    grace: float = CANDLE_GRACE_SECONDS) -> StreamFeed:
    """The feed COLLECTING reads, with `sources` saying for each part whether the stream or REST gives it."""
    timeframes = list(timeframes or settings.TIMEFRAMES)
    window = int(settings.INDICATOR_HISTORY_CANDLES)
    fresh = timedelta(seconds=settings.STREAM_FRESH_SECONDS)
    sources: dict[str, str] = {}
    now = rest.now() if hasattr(rest, "now") else as_of
    down = stream_up(name="business", now=now)
    candles_from_store = down is None
    if down is None:
        deadline = time.monotonic() + grace
        reason = candles_stale_reason(instrument=instrument, timeframes=timeframes, as_of=as_of, window=window)
        while reason is not None and "not in the store yet" in reason and time.monotonic() < deadline:
            time.sleep(0.25)  # the bar closed a moment ago: its push and write take up to a second or two
            reason = candles_stale_reason(instrument=instrument, timeframes=timeframes, as_of=as_of, window=window)
        candles_from_store = reason is None
        down = reason
    sources["candles"] = "stream" if candles_from_store else f"rest ({down})"
    live = None
    public_down = stream_up(name="public", now=now)
    if public_down is None:
        live = LiveMarket.objects.filter(instrument=instrument).first()
    for part, field in (("ticker", "ticker_ts"), ("book", "book_ts"), ("funding", "funding_ts"),
                        ("open_interest", "oi_ts")):
        stamp = getattr(live, field, None) if live is not None else None
        if public_down is not None:
            sources[part] = f"rest ({public_down})"
        elif stamp is None:
            sources[part] = "rest (not pushed yet)"
        elif abs(as_of - stamp) > fresh:  # OKX pushes funding every 30-90 s, the others on every change
            sources[part] = f"rest (last push {(as_of - stamp).total_seconds():.0f}s from the cycle's time)"
        else:
            sources[part] = "stream"
    return StreamFeed(rest=rest, instrument=instrument, candles_from_store=candles_from_store, live=live,
                      sources=sources)
