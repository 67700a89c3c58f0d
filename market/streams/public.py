"""What the OKX public and business streams push, and where it goes.

- `candle15m` / `candle1H` / `candle4H` (business endpoint): a CLOSED bar (confirm "1") is
  upserted into the candle store through `candles_upsert_many` (a still-forming bar is not
  stored: the store holds closed bars, and the cycle asks for those only); closes of 15m/1H
  bars also feed the stream triggers' 1H reference.
- `tickers`, `books5`, `funding-rate`, `open-interest` (public endpoint): the latest of each
  is kept in memory and written to `LiveMarket` (one row per instrument) about once a second,
  only for instruments that changed; open interest is also sampled into `OpenInterestSample`
  every `OI_SAMPLE_SECONDS` for the snapshot's live 4-hour change.
- a ticker is checked by `stream_triggers_check` (the 1H move, and the position watch's levels that
  `positions_apply` sets for the instruments with a position open); what fires goes to `on_trigger(inst_id, reason)`.

The event loop only validates and keeps (a few microseconds a push); `batch_take` hands what
changed to the caller, which writes it with `live_batch_write` on its database thread.
A push with a field that is not a number raises StreamDataError: the connection journals it
with the raw text and goes on.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog

from market.feeds.base import Bar, FeedDataError
from market.feeds.okx import OKX_BARS, parse_candle_row
from market.models import TIMEFRAME_SECONDS, Candle, Instrument, LiveMarket, OpenInterestSample
from market.streams.okx_ws import StreamDataError
from market.streams.triggers import InstrumentWatch, PositionLevels, stream_triggers_check

log = structlog.get_logger(__name__)
CANDLE_CHANNELS = {f"candle{bar}": tf for tf, bar in OKX_BARS.items()}
PUBLIC_CHANNELS = ("tickers", "books5", "funding-rate", "open-interest")
OI_SAMPLE_SECONDS = 300
OI_KEEP = timedelta(days=1)
BOOK_DEPTH = 5


def public_args(inst_ids: list[str]) -> list[dict[str, str]]:
    return [{"channel": channel, "instId": inst_id} for inst_id in inst_ids for channel in PUBLIC_CHANNELS]


def candle_args(inst_ids: list[str], timeframes: list[str]) -> list[dict[str, str]]:
    return [{"channel": f"candle{OKX_BARS[tf]}", "instId": inst_id} for inst_id in inst_ids for tf in timeframes]


def _num(row: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    """The field as OKX sent it, checked to be a finite number ("" or missing -> None)."""
    raw = row.get(key)
    if raw is None or raw == "":
        if required:
            raise StreamDataError(f"field {key!r} is missing or empty")
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise StreamDataError(f"field {key!r} is not a number: {str(raw)[:40]!r}") from None
    if not math.isfinite(value):
        raise StreamDataError(f"field {key!r} is not a finite number: {str(raw)[:40]!r}")
    return raw if isinstance(raw, str) else repr(raw)


def _level(raw: Any, key: str) -> str:
    """One book level's price or size, checked as `_num` checks a field (books5 comes up to 10 times a second
    per instrument: no dict per value on the usual path)."""
    if type(raw) is str and raw:
        try:
            if math.isfinite(float(raw)):
                return raw
        except ValueError:
            pass
    return _num({key: raw}, key, required=True)  # the same error `_num` gives, or a number sent as a number


def _row(data: list[Any]) -> dict[str, Any]:
    if not data or not isinstance(data[0], dict):
        raise StreamDataError("'data' holds no object")
    return data[0]


@dataclass
class LiveState:
    """One instrument's latest pushes, as OKX's strings (checked numbers)."""

    ticker: tuple[str | None, ...] | None = None  # last, bid, ask, open24h, high24h, low24h, volCcy24h, ts
    book: tuple[list[list[str]], list[list[str]], str] | None = None  # bids, asks, ts
    funding: tuple[str | None, str | None, str | None] | None = None  # rate, next funding time, ts
    oi: tuple[str | None, str | None, str | None, str] | None = None  # oi, oiCcy, oiUsd, ts
    oi_sampled_at: float = 0.0


@dataclass
class LiveBatch:
    """What changed since the last batch: written together by `live_batch_write`."""

    candles: dict[str, dict[str, list[Bar]]] = field(default_factory=dict)  # inst_id -> tf -> bars
    live: dict[str, LiveState] = field(default_factory=dict)
    oi_samples: list[tuple[str, datetime, str]] = field(default_factory=list)
    at: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.candles or self.live or self.oi_samples)


class PublicStreamHandler:
    """The public and business connections' handler (see the module docstring)."""

    def __init__(self, *, inst_ids: list[str], timeframes: list[str], move_threshold: float,
                 on_trigger: Callable[[str, str], None], on_gap: Callable[[str, bool], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.inst_ids = list(inst_ids)
        self.timeframes = list(timeframes)
        self.on_trigger, self.on_gap, self.clock = on_trigger, on_gap, clock
        self.watches = {i: InstrumentWatch(inst_id=i, move_threshold=move_threshold) for i in inst_ids}
        self.states = {i: LiveState() for i in inst_ids}
        self._dirty: set[str] = set()
        self._candles: dict[str, dict[str, dict[int, Bar]]] = {}
        self._oi_samples: list[tuple[str, datetime, str]] = []
        self.counts = {"candles_closed": 0, "candles_forming": 0, "tickers": 0, "books": 0, "funding": 0, "oi": 0,
                       "triggers": 0}
        self._handlers: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "tickers": self._ticker, "books5": self._book, "funding-rate": self._funding,
            "open-interest": self._open_interest,
        }

    # -- the connection's callbacks ---------------------------------------------------------------
    def on_connected(self, *, stream: str, reconnect: bool) -> None:
        if self.on_gap is not None:
            self.on_gap(stream, reconnect)

    def on_push(self, channel: str, arg: dict[str, Any], data: list[Any], message: dict[str, Any]) -> None:
        inst_id = arg.get("instId")
        if inst_id not in self.states:
            raise StreamDataError(f"a push for an instrument we did not subscribe: {str(inst_id)[:40]!r}")
        handler = self._handlers.get(channel)
        if handler is not None:
            handler(inst_id, _row(data))
            return
        timeframe = CANDLE_CHANNELS.get(channel)
        if timeframe is None:
            raise StreamDataError(f"unknown channel {channel[:40]!r}")
        self._candle_rows(inst_id, timeframe, data)

    # -- channels ----------------------------------------------------------------------------------
    def _candle_rows(self, inst_id: str, timeframe: str, rows: list[Any]) -> None:
        bars = []
        for row in rows:
            try:
                bars.append(parse_candle_row(row))
            except FeedDataError as exc:
                raise StreamDataError(str(exc)) from None
        step = TIMEFRAME_SECONDS[timeframe]
        for bar in bars:
            if not bar.confirmed:
                self.counts["candles_forming"] += 1
                continue  # the bar is still forming: the store keeps closed bars only
            self.counts["candles_closed"] += 1
            self._candles.setdefault(inst_id, {}).setdefault(timeframe, {})[int(bar.ts.timestamp())] = bar
            self.watches[inst_id].candle_closed(timeframe, bar.ts.timestamp() + step, float(bar.close))

    def _ticker(self, inst_id: str, row: dict[str, Any]) -> None:
        last = _num(row, "last", required=True)
        ts = _num(row, "ts", required=True)
        state = self.states[inst_id]
        state.ticker = (last, _num(row, "bidPx"), _num(row, "askPx"), _num(row, "open24h"), _num(row, "high24h"),
                        _num(row, "low24h"), _num(row, "volCcy24h"), ts)
        self._dirty.add(inst_id)
        self.counts["tickers"] += 1
        for reason in stream_triggers_check(watch=self.watches[inst_id], price=float(last), now=self.clock()):  # type: ignore[arg-type]
            self.counts["triggers"] += 1
            log.info("stream_trigger", inst_id=inst_id, reason=reason)
            self.on_trigger(inst_id, reason)

    def _book(self, inst_id: str, row: dict[str, Any]) -> None:
        sides = []
        for side in ("bids", "asks"):
            levels = row.get(side)
            if not isinstance(levels, list):
                raise StreamDataError(f"{side!r} is not a list")
            kept = []
            for level in levels[:BOOK_DEPTH]:
                if not isinstance(level, list) or len(level) < 2:
                    raise StreamDataError(f"a {side} level has the wrong shape: {str(level)[:40]}")
                kept.append([_level(level[0], "px"), _level(level[1], "sz")])
            sides.append(kept)
        self.states[inst_id].book = (sides[0], sides[1], _num(row, "ts", required=True))  # type: ignore[arg-type]
        self._dirty.add(inst_id)
        self.counts["books"] += 1

    def _funding(self, inst_id: str, row: dict[str, Any]) -> None:
        # OKX sends "" for rates it does not know yet (nextFundingRate): None, not an error.
        self.states[inst_id].funding = (_num(row, "fundingRate"), _num(row, "nextFundingTime") or _num(row, "fundingTime"),
                                        _num(row, "ts"))
        self._dirty.add(inst_id)
        self.counts["funding"] += 1

    def _open_interest(self, inst_id: str, row: dict[str, Any]) -> None:
        ts = _num(row, "ts", required=True)
        oi = _num(row, "oi")
        state = self.states[inst_id]
        state.oi = (oi, _num(row, "oiCcy"), _num(row, "oiUsd"), ts)  # type: ignore[assignment]
        now = self.clock()
        if oi is not None and now - state.oi_sampled_at >= OI_SAMPLE_SECONDS:
            state.oi_sampled_at = now
            self._oi_samples.append((inst_id, _ms(ts), oi))  # type: ignore[arg-type]
        self._dirty.add(inst_id)
        self.counts["oi"] += 1

    # -- batches -----------------------------------------------------------------------------------
    def batch_take(self) -> LiveBatch:
        """What changed since the last call (event-loop side: no database here)."""
        batch = LiveBatch(at=self.clock())
        for inst_id, by_tf in self._candles.items():
            batch.candles[inst_id] = {tf: [bars[t] for t in sorted(bars)] for tf, bars in by_tf.items() if bars}
        self._candles = {}
        # The states are replaced (never mutated) by the channel handlers: a shallow copy is a snapshot.
        batch.live = {i: LiveState(s.ticker, s.book, s.funding, s.oi) for i in self._dirty for s in (self.states[i],)}
        self._dirty = set()
        batch.oi_samples, self._oi_samples = self._oi_samples, []
        return batch

    def positions_apply(self, levels: dict[str, PositionLevels]) -> None:
        """The position watch's levels of the instruments with a position open (event-loop side); others: none."""
        for inst_id, watch in self.watches.items():
            found = levels.get(inst_id)
            if found is None and watch.position is not None:
                watch.active["position_watch"] = False  # closed: a new position starts from a clean edge
            watch.position = found

    def watches_read(self, *, instruments: dict[str, Instrument]) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """The triggers' 1H reference candles from the store (database thread): inst_id -> tf -> (close time, close)."""
        found: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for inst_id, instrument in instruments.items():
            for tf in ("15m", "1H"):
                step = TIMEFRAME_SECONDS[tf]
                rows = (Candle.objects.filter(instrument=instrument, timeframe=tf, confirmed=True)
                        .order_by("-ts").values_list("ts", "close")[:8])
                found.setdefault(inst_id, {})[tf] = [(ts.timestamp() + step, float(c)) for ts, c in reversed(list(rows))]
        return found

    def watches_apply(self, found: dict[str, dict[str, list[tuple[float, float]]]]) -> None:
        """What `watches_read` found, into the watches (event-loop side)."""
        for inst_id, by_tf in found.items():
            watch = self.watches.get(inst_id)
            for tf, closes in by_tf.items():
                for close_time, close in closes if watch is not None else ():
                    watch.candle_closed(tf, close_time, close)


def _ms(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromtimestamp(int(Decimal(text)) / 1000, tz=UTC)
    except (InvalidOperation, ValueError, OverflowError, OSError):
        return None


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


_LIVE_FIELDS = ["last", "bid", "ask", "open_24h", "high_24h", "low_24h", "volume_24h", "ticker_ts", "book", "book_ts",
                "funding_rate", "next_funding_time", "funding_ts", "oi", "oi_ccy", "oi_usd", "oi_ts", "updated_at"]


def live_row(instrument: Instrument, state: LiveState, *, at: datetime) -> LiveMarket:
    row = LiveMarket(instrument=instrument, updated_at=at)
    if state.ticker is not None:
        t = state.ticker
        row.last, row.bid, row.ask, row.open_24h, row.high_24h, row.low_24h, row.volume_24h = (_dec(v) for v in t[:7])
        row.ticker_ts = _ms(t[7])
    if state.book is not None:
        bids, asks, ts = state.book
        row.book, row.book_ts = {"bids": bids, "asks": asks}, _ms(ts)
    if state.funding is not None:
        rate, next_time, ts = state.funding
        row.funding_rate, row.next_funding_time, row.funding_ts = _dec(rate), _ms(next_time), _ms(ts) or at
    if state.oi is not None:
        oi, oi_ccy, oi_usd, ts = state.oi
        row.oi, row.oi_ccy, row.oi_usd, row.oi_ts = _dec(oi), _dec(oi_ccy), _dec(oi_usd), _ms(ts)
    return row


def live_batch_write(*, batch: LiveBatch, instruments: dict[str, Instrument]) -> dict[str, int]:
    """Write a batch (database thread): closed candles, the live rows, open-interest samples."""
    from market.services import candles_upsert_many

    written = {"candles": 0, "live": 0, "oi_samples": 0}
    for inst_id, by_tf in batch.candles.items():
        written["candles"] += candles_upsert_many(instrument=instruments[inst_id], bars_by_timeframe=by_tf)
    at = datetime.fromtimestamp(batch.at, tz=UTC)
    rows = [live_row(instruments[i], state, at=at) for i, state in batch.live.items()]
    if rows:
        LiveMarket.objects.bulk_create(rows, update_conflicts=True, unique_fields=["instrument"],
                                       update_fields=_LIVE_FIELDS, batch_size=500)
        written["live"] = len(rows)
    samples = [OpenInterestSample(instrument=instruments[i], ts=ts, oi=Decimal(oi))
               for i, ts, oi in batch.oi_samples if ts is not None]
    if samples:
        OpenInterestSample.objects.bulk_create(samples, ignore_conflicts=True)
        OpenInterestSample.objects.filter(ts__lt=at - OI_KEEP).delete()
        written["oi_samples"] = len(samples)
    return written


def candles_gap_fill(*, feed: Any, instruments: list[Instrument], timeframes: list[str], limit: int) -> int:
    """After a (re)connect: the closed candles the stream missed, from REST (resumable backfill)."""
    from market.services import candles_backfill

    added = 0
    for instrument in instruments:
        for tf in timeframes:
            added += candles_backfill(feed=feed, instrument=instrument, timeframe=tf, limit=limit)
    log.info("stream_gap_filled", instruments=len(instruments), timeframes=timeframes, added=added)
    return added
