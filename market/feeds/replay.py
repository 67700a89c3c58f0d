"""Candles from a CSV file or the database, replayed on a virtual clock.

The rule that matters: a ReplayFeed never returns a bar whose close time
(open + timeframe) is after its clock, on any timeframe, derived or not.

- Series are numpy arrays (open times in epoch ms, float OHLCV); lookups are
  `searchsorted` on the open times, and each Bar is built once and cached, so
  a year of 5-minute cycles costs slices, not DataFrames of the whole history.
- Missing timeframes are derived from the finest loaded one that divides them
  (e.g. 5m -> 15m/1H/4H) by UTC-aligned resampling: open first, high max,
  low min, close last, volume sum. Only complete buckets (every base bar
  present) become bars; a bucket still forming at the clock closes after the
  clock and so is never returned.
- Ticker: the close of the last closed bar of the finest timeframe; no bid/ask
  (a replay has no quotes); 24 h fields from the finest bars of the last 24 h.
- Order book: a replay has no order book, so `order_book` returns an EMPTY
  book (no bids, no asks); consumers must treat empty as "unknown".
- Funding: the last settled rate at or before the clock (from an optional
  `ts,funding_rate` CSV) and the next 8-hourly settlement; rate None without data.
- Open interest: optional series; None without data.
- Clock: `set_clock(dt)`. With no clock set, `now()` is wall time (a live bot
  on a generated market); the default for a file replay is the close of its
  last bar.
- A replay directory (`replay_dir_write` / `ReplayFeed.from_dir`): candle and
  funding CSVs plus a `manifest.json` naming the feed, the instruments' specs
  and the files. `manage.py demo` writes one from OKX public data so its
  worker processes (MARKET_DATA_SOURCE=replay) replay exactly what it fetched.
"""
from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from market.feeds.base import (
    Bar,
    FeedDataError,
    FeedPermanentError,
    FundingRate,
    InstrumentSpec,
    OpenInterest,
    OrderBook,
    Ticker,
)
from market.models import TIMEFRAME_SECONDS

FUNDING_INTERVAL_MS = 8 * 3600 * 1000
DAY_MS = 86_400_000


def tf_ms(timeframe: str) -> int:
    try:
        return TIMEFRAME_SECONDS[timeframe] * 1000
    except KeyError:
        known = ", ".join(TIMEFRAME_SECONDS)
        raise FeedPermanentError(f"unknown timeframe {timeframe!r}; expected one of {known}") from None


def ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def dt_to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware (UTC)")
    return int(dt.timestamp() * 1000)


def _dec(x: float) -> Decimal:
    # repr of a float parsed from text is that text again ("60000.1"), so this is exact for CSV input.
    return Decimal(repr(float(x)))


@dataclass(slots=True)
class _DayRange:
    """The last 24 h high and low `Series.day_range` gave: its bars, where the extremes are, their Decimals."""

    start: int
    end: int
    high: float
    high_at: int
    high_dec: Decimal
    low: float
    low_at: int
    low_dec: Decimal


@dataclass
class Series:
    """One instrument's bars on one timeframe: sorted open times (ms) and float OHLCV."""

    tf_ms: int
    ts: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    _bars: list[Bar | None] = field(default_factory=list, repr=False)
    _day_range: _DayRange | None = field(default=None, repr=False)
    _positive_hl: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.ts = np.asarray(self.ts, dtype=np.int64)
        for name in ("open", "high", "low", "close", "volume"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        if len(self.ts) > 1 and np.any(np.diff(self.ts) <= 0):
            order = np.argsort(self.ts, kind="stable")
            self.ts = self.ts[order]
            for name in ("open", "high", "low", "close", "volume"):
                setattr(self, name, getattr(self, name)[order])
            keep = np.concatenate([[True], np.diff(self.ts) > 0])  # duplicates: keep the first
            self.ts = self.ts[keep]
            for name in ("open", "high", "low", "close", "volume"):
                setattr(self, name, getattr(self, name)[keep])
        self._bars = [None] * len(self.ts)
        # No NaN and no zeros (so no signed zeros): equal highs (lows) are the same float.
        self._positive_hl = bool((self.high > 0).all() and (self.low > 0).all())

    def __len__(self) -> int:
        return len(self.ts)

    def closed_end(self, clock_ms: int, before_ms: int | None = None) -> int:
        """Index one past the last bar closed by `clock_ms` (and opening before `before_ms`)."""
        end = int(self.ts.searchsorted(clock_ms - self.tf_ms, side="right"))
        if before_ms is not None:
            end = min(end, int(self.ts.searchsorted(before_ms, side="left")))
        return end

    def day_range(self, start: int, end: int) -> tuple[Decimal, Decimal]:
        """`_dec` of (high[start:end].max(), low[start:end].min()), start < end: the ticker's 24 h high and low.

        The ticker's window slides forward a bar at a time, so while the last answer's extremes are
        still inside it only the bars added since are compared, and an unchanged extreme keeps its
        Decimal. Max and min are exact, so this is the slices' own answer.
        """
        if not self._positive_hl:  # NaN or zero prices: the slices' own max and min, nothing remembered
            return _dec(self.high[start:end].max()), _dec(self.low[start:end].min())
        last = self._day_range
        # The window moved forward by a few bars and both extremes are still in it.
        if (last is not None and last.start <= start <= min(last.high_at, last.low_at)
                and last.end <= end <= last.end + 12):
            high, high_at, low, low_at = last.high, last.high_at, last.low, last.low_at
            for i in range(last.end, end):
                h, lo = float(self.high[i]), float(self.low[i])
                if h >= high:
                    high, high_at = h, i
                if lo <= low:
                    low, low_at = lo, i
        else:
            high_at = start + int(self.high[start:end].argmax())
            low_at = start + int(self.low[start:end].argmin())
            high, low = float(self.high[high_at]), float(self.low[low_at])
        high_dec = last.high_dec if last is not None and high == last.high else _dec(high)
        low_dec = last.low_dec if last is not None and low == last.low else _dec(low)
        self._day_range = _DayRange(start, end, high, high_at, high_dec, low, low_at, low_dec)
        return high_dec, low_dec

    def bar(self, i: int) -> Bar:
        cached = self._bars[i]
        if cached is None:
            cached = Bar(ts=ms_to_dt(int(self.ts[i])), open=_dec(self.open[i]), high=_dec(self.high[i]),
                         low=_dec(self.low[i]), close=_dec(self.close[i]), volume=_dec(self.volume[i]), confirmed=True)
            self._bars[i] = cached
        return cached

    def resample(self, target_ms: int) -> Series:
        """UTC-aligned OHLCV buckets of `target_ms`; only complete buckets are kept."""
        if target_ms % self.tf_ms:
            raise FeedPermanentError(f"cannot build {target_ms // 1000}s bars from {self.tf_ms // 1000}s bars")
        per_bucket = target_ms // self.tf_ms
        if len(self.ts) == 0:
            return Series(target_ms, *(np.empty(0),) * 6)
        buckets = self.ts - self.ts % target_ms
        starts = np.flatnonzero(np.concatenate([[True], buckets[1:] != buckets[:-1]]))
        counts = np.diff(np.append(starts, len(buckets)))
        ends = starts + counts - 1
        complete = counts == per_bucket
        return Series(
            target_ms,
            buckets[starts][complete],
            self.open[starts][complete],
            np.maximum.reduceat(self.high, starts)[complete],
            np.minimum.reduceat(self.low, starts)[complete],
            self.close[ends][complete],
            # Rounded to 8 dp: float summation noise must not show up as volume digits.
            np.round(np.add.reduceat(self.volume, starts), 8)[complete],
        )


def read_candle_csv(path: str | Path) -> dict[str, np.ndarray]:
    """`ts,open,high,low,close,volume` (ts = open time, epoch ms; .gz allowed) -> arrays."""
    path = Path(path)
    if not path.is_file():
        raise FeedPermanentError(f"candle CSV not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as fh:  # type: ignore[operator]
        header = next(csv.reader(fh), None)
    expected = ["ts", "open", "high", "low", "close", "volume"]
    if header is None or [h.strip().lower() for h in header[:6]] != expected:
        raise FeedPermanentError(f"{path}: expected a header {','.join(expected)}, got {header}")
    try:
        frame = pd.read_csv(path, usecols=expected, dtype={"ts": "int64"}, keep_default_na=True)
    except ValueError as e:
        raise FeedPermanentError(f"{path}: unreadable candle CSV: {e}") from e
    for name in expected[1:]:
        if not pd.api.types.is_numeric_dtype(frame[name]):  # a cell that is not a number: say where, not just what
            numbers = pd.to_numeric(frame[name], errors="coerce")
            bad = numbers.isna() & frame[name].notna()
            if bad.any():
                row = int(bad.to_numpy().argmax())
                raise FeedDataError(f"{path}: line {row + 2}: {name} {frame[name].iloc[row]!r} is not a number")
            frame[name] = numbers
    frame["volume"] = frame["volume"].fillna(0.0)  # mark-price files have no volume
    if frame[["open", "high", "low", "close"]].isna().any().any():
        raise FeedPermanentError(f"{path}: empty price cells")
    return {name: frame[name].to_numpy() for name in expected}


def infer_timeframe(ts_ms: np.ndarray) -> str:
    """The timeframe whose length is the most common step between open times."""
    if len(ts_ms) < 2:
        raise FeedPermanentError("need at least two candles to tell the timeframe")
    steps, counts = np.unique(np.diff(ts_ms), return_counts=True)
    step = int(steps[np.argmax(counts)])
    for name, seconds in TIMEFRAME_SECONDS.items():
        if seconds * 1000 == step:
            return name
    raise FeedPermanentError(f"candle spacing of {step} ms is not a known timeframe")


class ReplayFeed:
    """A MarketFeed over stored candles on a virtual clock (see the module docstring)."""

    name = "replay"

    def __init__(self, *, clock: datetime | None = None, instruments: list[InstrumentSpec] | None = None,
                 name: str | None = None) -> None:
        self._native: dict[tuple[str, str], Series] = {}
        self._derived: dict[tuple[str, str], Series] = {}
        self._funding: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._oi: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._specs = {s.inst_id: s for s in instruments or []}
        self._clock_ms: int | None = None
        self._finest_series: dict[str, Series] = {}
        # The last answer of each per-instrument lookup, by the data row it came from: a replay asks
        # every 5 minutes for values that change every hour (open interest) or 8 hours (funding).
        # The values are frozen, so handing the same one out again is handing out an equal one.
        self._funding_last: dict[str, tuple[tuple[int, int], FundingRate]] = {}
        self._oi_last: dict[str, tuple[int, OpenInterest]] = {}
        self._oi_at_last: dict[str, tuple[int, Decimal]] = {}
        if clock is not None:
            self.set_clock(clock)
        if name:
            self.name = name

    # -- loading ----------------------------------------------------------
    def add_series(self, inst_id: str, timeframe: str, *, ts: np.ndarray, open: np.ndarray, high: np.ndarray,
                   low: np.ndarray, close: np.ndarray, volume: np.ndarray) -> None:
        self._native[(inst_id, timeframe)] = Series(tf_ms(timeframe), ts, open, high, low, close, volume)
        self._derived = {k: v for k, v in self._derived.items() if k[0] != inst_id}
        self._finest_series.pop(inst_id, None)

    def add_csv(self, inst_id: str, path: str | Path, timeframe: str | None = None) -> str:
        """Load a candle CSV; the timeframe is inferred from the spacing unless given. Returns it."""
        arrays = read_candle_csv(path)
        timeframe = timeframe or infer_timeframe(arrays["ts"])
        self.add_series(inst_id, timeframe, **arrays)
        return timeframe

    def add_funding_csv(self, inst_id: str, path: str | Path) -> None:
        """`ts,funding_rate` (ts = settlement time, epoch ms)."""
        frame = pd.read_csv(path)
        if list(frame.columns[:2]) != ["ts", "funding_rate"]:
            raise FeedPermanentError(f"{path}: expected a header ts,funding_rate")
        self.add_funding(inst_id, ts=frame["ts"].to_numpy(np.int64), rate=frame["funding_rate"].to_numpy(float))

    def add_funding(self, inst_id: str, *, ts: np.ndarray, rate: np.ndarray) -> None:
        order = np.argsort(ts)
        self._funding[inst_id] = (np.asarray(ts, np.int64)[order], np.asarray(rate, float)[order])
        self._funding_last.pop(inst_id, None)

    def add_open_interest(self, inst_id: str, *, ts: np.ndarray, oi_contracts: np.ndarray,
                          oi_ccy: np.ndarray | None = None) -> None:
        order = np.argsort(ts)
        self._oi[inst_id] = (np.asarray(ts, np.int64)[order], np.asarray(oi_contracts, float)[order],
                             None if oi_ccy is None else np.asarray(oi_ccy, float)[order])
        self._oi_last.pop(inst_id, None)
        self._oi_at_last.pop(inst_id, None)

    @classmethod
    def from_csv(cls, path: str | Path, *, inst_id: str, timeframe: str | None = None,
                 funding_csv: str | Path | None = None, instrument: InstrumentSpec | None = None,
                 clock: datetime | None = None) -> ReplayFeed:
        """A replay of one CSV; the clock starts at the close of its last bar unless given."""
        feed = cls(instruments=[instrument] if instrument else None)
        tf = feed.add_csv(inst_id, path, timeframe)
        if funding_csv:
            feed.add_funding_csv(inst_id, funding_csv)
        series = feed._native[(inst_id, tf)]
        feed.set_clock(clock or ms_to_dt(int(series.ts[-1]) + series.tf_ms))
        return feed

    @classmethod
    def from_dir(cls, path: str | Path, *, clock: datetime | None = None) -> ReplayFeed:
        """The replay directory `replay_dir_write` wrote; the clock starts at the close of its last bar unless given."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FeedPermanentError(f"no replay in {path}: {MANIFEST} is missing "
                                     "(`manage.py demo` writes one from OKX public data)")
        try:
            manifest = json.loads(manifest_path.read_text())
            specs = [InstrumentSpec(**{k: Decimal(v) if k in _SPEC_DECIMALS else v for k, v in row.items()})
                     for row in manifest["instruments"]]
            candles: dict[str, dict[str, str]] = manifest["candles"]
            funding: dict[str, str] = manifest.get("funding", {})
        except (ValueError, KeyError, TypeError) as e:
            raise FeedPermanentError(f"{manifest_path}: unreadable replay manifest: {e}") from e
        feed = cls(instruments=specs, name=str(manifest.get("name") or "replay"))
        last_close = 0
        for inst_id, files in candles.items():
            for timeframe, file in files.items():
                feed.add_csv(inst_id, path / file, timeframe)
                series = feed._native[(inst_id, timeframe)]
                if len(series):
                    last_close = max(last_close, int(series.ts[-1]) + series.tf_ms)
        for inst_id, file in funding.items():
            feed.add_funding_csv(inst_id, path / file)
        if clock is not None:
            feed.set_clock(clock)
        elif last_close:
            feed.set_clock(ms_to_dt(last_close))
        return feed

    @classmethod
    def from_db(cls, *, inst_ids: list[str], timeframes: list[str], since: datetime | None = None,
                until: datetime | None = None, clock: datetime | None = None) -> ReplayFeed:
        """Confirmed candles from the database (one query per instrument and timeframe)."""
        from market.models import Candle, Instrument

        instruments = list(Instrument.objects.filter(inst_id__in=inst_ids))
        specs = [InstrumentSpec(i.inst_id, i.inst_type, i.ct_val, i.lot_sz, i.min_sz, i.tick_sz, i.max_lever,
                                i.settle_ccy, i.state) for i in instruments]
        feed = cls(instruments=specs)
        last_close = 0
        for inst in instruments:
            for tf in timeframes:
                rows = Candle.objects.filter(instrument=inst, timeframe=tf, confirmed=True)
                if since is not None:
                    rows = rows.filter(ts__gte=since)
                if until is not None:
                    rows = rows.filter(ts__lte=until)
                data = list(rows.order_by("ts").values_list("ts", "open", "high", "low", "close", "volume"))
                if not data:
                    continue
                cols = list(zip(*data))
                ts = np.array([dt_to_ms(t) for t in cols[0]], dtype=np.int64)
                fields = ["open", "high", "low", "close", "volume"]
                feed.add_series(inst.inst_id, tf, ts=ts,
                                **{name: np.array(cols[i + 1], dtype=float) for i, name in enumerate(fields)})
                last_close = max(last_close, int(ts[-1]) + tf_ms(tf))
        if clock is not None:
            feed.set_clock(clock)
        elif last_close:
            feed.set_clock(ms_to_dt(last_close))
        return feed

    # -- the clock --------------------------------------------------------
    def set_clock(self, dt: datetime) -> None:
        self._clock_ms = dt_to_ms(dt)

    def now(self) -> datetime:
        return ms_to_dt(self._clock_ms) if self._clock_ms is not None else datetime.now(UTC)

    def _now_ms(self) -> int:
        return self._clock_ms if self._clock_ms is not None else dt_to_ms(datetime.now(UTC))

    # -- series lookup ----------------------------------------------------
    def inst_ids(self) -> list[str]:
        return sorted({k[0] for k in self._native})

    def timeframes(self, inst_id: str) -> list[str]:
        return sorted((k[1] for k in self._native if k[0] == inst_id), key=lambda t: TIMEFRAME_SECONDS[t])

    def series(self, inst_id: str, timeframe: str) -> Series:
        key = (inst_id, timeframe)
        if key in self._native:
            return self._native[key]
        if key not in self._derived:
            target = tf_ms(timeframe)
            bases = [tf for tf in self.timeframes(inst_id) if tf_ms(tf) < target and target % tf_ms(tf) == 0]
            if not bases:
                raise FeedPermanentError(
                    f"replay has no {timeframe} candles for {inst_id} and nothing finer to build them from")
            self._derived[key] = self._native[(inst_id, bases[0])].resample(target)
        return self._derived[key]

    def _finest(self, inst_id: str) -> Series:
        finest = self._finest_series.get(inst_id)
        if finest is None:
            tfs = self.timeframes(inst_id)
            if not tfs:
                raise FeedPermanentError(f"replay has no candles for {inst_id}")
            finest = self._finest_series[inst_id] = self._native[(inst_id, tfs[0])]
        return finest

    def data_range(self, inst_id: str) -> tuple[datetime, datetime]:
        """(open of the first, close of the last) bar of the finest timeframe."""
        s = self._finest(inst_id)
        return ms_to_dt(int(s.ts[0])), ms_to_dt(int(s.ts[-1]) + s.tf_ms)

    # -- MarketFeed -------------------------------------------------------
    def instruments(self, inst_type: str = "SWAP") -> list[InstrumentSpec]:
        return [s for s in self._specs.values() if s.inst_type == inst_type]

    def candles(self, inst_id: str, timeframe: str, *, limit: int = 300, before: datetime | None = None) -> list[Bar]:
        """Up to `limit` bars closed by the clock (and opening before `before`), oldest first."""
        s = self.series(inst_id, timeframe)
        end = s.closed_end(self._now_ms(), dt_to_ms(before) if before is not None else None)
        start = max(0, end - max(limit, 0))
        return [s.bar(i) for i in range(start, end)]

    def frame(self, inst_id: str, timeframe: str, *, limit: int = 1000, before: datetime | None = None) -> pd.DataFrame:
        """The same bars as `candles`, as the DataFrame `market.selectors.candles_frame` returns."""
        s = self.series(inst_id, timeframe)
        end = s.closed_end(self._now_ms(), dt_to_ms(before) if before is not None else None)
        start = max(0, end - max(limit, 0))
        index = pd.DatetimeIndex(pd.to_datetime(s.ts[start:end], unit="ms", utc=True), name="ts")
        return pd.DataFrame({"open": s.open[start:end], "high": s.high[start:end], "low": s.low[start:end],
                             "close": s.close[start:end], "volume": s.volume[start:end]}, index=index)

    def ticker(self, inst_id: str) -> Ticker:
        s = self._finest(inst_id)
        now = self._now_ms()
        end = s.closed_end(now)
        if end == 0:
            raise FeedPermanentError(f"replay has no closed {inst_id} bar at {ms_to_dt(now).isoformat()}")
        last_close_ms = int(s.ts[end - 1]) + s.tf_ms
        day_start = int(s.ts.searchsorted(last_close_ms - DAY_MS, side="left"))
        high_24h, low_24h = s.day_range(day_start, end)
        return Ticker(
            inst_id=inst_id,
            ts=ms_to_dt(last_close_ms),
            last=_dec(s.close[end - 1]),
            bid=None,
            ask=None,
            open_24h=_dec(s.open[day_start]),
            high_24h=high_24h,
            low_24h=low_24h,
            volume_24h=_dec(round(float(s.volume[day_start:end].sum()), 8)),
        )

    def last_price(self, inst_id: str) -> Decimal:
        """`ticker(inst_id).last` without the rest of the ticker (the 24h range and volume): a replay's
        bulk path reads only the price of most cycles (tradebot/replay_bulk.py)."""
        s = self._finest(inst_id)
        end = s.closed_end(self._now_ms())
        if end == 0:
            raise FeedPermanentError(f"replay has no closed {inst_id} bar at {self.now().isoformat()}")
        return _dec(s.close[end - 1])

    def order_book(self, inst_id: str, depth: int = 5) -> OrderBook:
        return OrderBook(inst_id=inst_id, ts=self.now(), bids=(), asks=())

    def funding_rate(self, inst_id: str) -> FundingRate:
        now = self._now_ms()
        next_ms = (now // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS
        data = self._funding.get(inst_id)
        i = -1 if data is None else int(data[0].searchsorted(now, side="right")) - 1
        if data is None or i < 0:
            return FundingRate(inst_id=inst_id, ts=self.now(), rate=None, next_funding_time=ms_to_dt(next_ms))
        last = self._funding_last.get(inst_id)
        if last is not None and last[0] == (i, next_ms):
            return last[1]
        ts, rate = data
        funding = FundingRate(inst_id=inst_id, ts=ms_to_dt(int(ts[i])), rate=_dec(rate[i]),
                              next_funding_time=ms_to_dt(next_ms))
        self._funding_last[inst_id] = ((i, next_ms), funding)
        return funding

    def funding_rate_value(self, inst_id: str) -> Decimal | None:
        """`funding_rate(inst_id).rate` without building the FundingRate (the bulk replay path reads only the rate)."""
        data = self._funding.get(inst_id)
        if data is None:
            return None
        i = int(data[0].searchsorted(self._now_ms(), side="right")) - 1
        return None if i < 0 else self.funding_rate(inst_id).rate

    def open_interest_value(self, inst_id: str) -> Decimal | None:
        """`open_interest(inst_id).oi_contracts` without building the OpenInterest when there is none."""
        data = self._oi.get(inst_id)
        if data is None:
            return None
        i = int(data[0].searchsorted(self._now_ms(), side="right")) - 1
        return None if i < 0 else self.open_interest(inst_id).oi_contracts

    def open_interest(self, inst_id: str) -> OpenInterest:
        data = self._oi.get(inst_id)
        i = -1 if data is None else int(data[0].searchsorted(self._now_ms(), side="right")) - 1
        if data is None or i < 0:
            return OpenInterest(inst_id=inst_id, ts=self.now(), oi_contracts=None, oi_ccy=None)
        last = self._oi_last.get(inst_id)
        if last is not None and last[0] == i:
            return last[1]
        ts, contracts, ccy = data
        oi = OpenInterest(inst_id=inst_id, ts=ms_to_dt(int(ts[i])), oi_contracts=_dec(contracts[i]),
                          oi_ccy=None if ccy is None else _dec(ccy[i]))
        self._oi_last[inst_id] = (i, oi)
        return oi

    def open_interest_at(self, inst_id: str, when: datetime) -> Decimal | None:
        """Open interest (contracts) at or before `when` (never after the clock): for the 4H change."""
        data = self._oi.get(inst_id)
        if data is None:
            return None
        i = int(data[0].searchsorted(min(dt_to_ms(when), self._now_ms()), side="right")) - 1
        if i < 0:
            return None
        last = self._oi_at_last.get(inst_id)
        if last is None or last[0] != i:
            last = self._oi_at_last[inst_id] = (i, _dec(data[1][i]))
        return last[1]


MANIFEST = "manifest.json"
_SPEC_DECIMALS = ("ct_val", "lot_sz", "min_sz", "tick_sz", "max_lever")


def replay_dir_write(path: str | Path, *, name: str, instruments: list[InstrumentSpec],
                     candles: dict[str, dict[str, list[Bar]]],
                     funding: dict[str, list[FundingRate]] | None = None) -> Path:
    """Write candles (confirmed bars only) and funding as CSVs plus the manifest `ReplayFeed.from_dir` reads.

    Prices are written as the Decimal strings the feed returned, so a replay
    reads back the venue's numbers. The manifest is written last: a directory
    whose manifest names the files is complete.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for inst_id, by_tf in candles.items():
        for timeframe, bars in by_tf.items():
            tf_ms(timeframe)  # an unknown timeframe fails here, not when the replay is read
            closed = sorted((b for b in bars if b.confirmed), key=lambda b: b.ts)
            if len(closed) < 2:
                raise FeedPermanentError(f"{inst_id} {timeframe}: need at least two closed candles to replay")
            file = f"{inst_id}_{timeframe}.csv"
            with open(path / file, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["ts", "open", "high", "low", "close", "volume"])
                writer.writerows([dt_to_ms(b.ts), b.open, b.high, b.low, b.close, b.volume] for b in closed)
            files.setdefault(inst_id, {})[timeframe] = file
    funding_files: dict[str, str] = {}
    for inst_id, rates in (funding or {}).items():
        known = sorted((r for r in rates if r.rate is not None), key=lambda r: r.ts)
        if not known:
            continue
        file = f"{inst_id}_funding_rate.csv"
        with open(path / file, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["ts", "funding_rate"])
            writer.writerows([dt_to_ms(r.ts), r.rate] for r in known)
        funding_files[inst_id] = file
    manifest = {
        "name": name,
        "instruments": [{k: str(getattr(s, k)) if k in _SPEC_DECIMALS else getattr(s, k)
                         for k in InstrumentSpec.__dataclass_fields__} for s in instruments],
        "candles": files,
        "funding": funding_files,
    }
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(path / MANIFEST)
    return path
