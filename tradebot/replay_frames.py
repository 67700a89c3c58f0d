"""The replay's market history: candle frames and indicators computed once per history, and the
snapshots built from them (tradebot/replay.py, tradebot/replay_bulk.py).

Many replays in one process (a validation's folds, a parameter search's trials, `replay --learn`'s
validations) replay the same candles again and again. The indicators over a history and the
`TimeframeSeries` built on them (most of a replay's start-up: ~1 s for a month of 5-minute cycles)
are kept in a small cache keyed by what they are computed from: the instrument, the timeframe and a
digest of the candles themselves (their times and OHLCV), so a hit is exactly the same input, whatever
feed object it came from, and a feed whose candles differ never gets another's indicators.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from django.conf import settings

from market.schemas import MarketSnapshot

_FOUR_HOURS = timedelta(hours=4)
HISTORY_CACHE_SIZE = 12  # (instrument, timeframe, candles) entries kept: a few folds x 3 timeframes x 2 instruments
_HISTORY: OrderedDict[tuple[Any, ...], tuple[pd.DataFrame, pd.DataFrame | None, Any]] = OrderedDict()
HISTORY_STATS = {"hits": 0, "misses": 0}


def _digest(frame: pd.DataFrame) -> str:
    """The candles' identity: their open times and OHLCV, bit for bit."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(frame.index.asi8).tobytes())
    for column in ("open", "high", "low", "close", "volume"):
        h.update(np.ascontiguousarray(frame[column].to_numpy(dtype=np.float64)).tobytes())
    return h.hexdigest()


def history_cache_clear() -> None:
    _HISTORY.clear()
    HISTORY_STATS.update(hits=0, misses=0)


def timeframe_history(*, inst_id: str, timeframe: str, frame: pd.DataFrame, window: int,
                      recent: int) -> tuple[pd.DataFrame, pd.DataFrame | None, Any]:
    """(frame, its indicators or None when empty, its `TimeframeSeries`), from the cache when the same
    candles were seen before in this process (the cached frame then stands in for `frame`: equal to it)."""
    from market.indicators import indicators_compute
    from market.snapshot import TimeframeSeries

    key = (inst_id, timeframe, len(frame), _digest(frame) if len(frame) else "", window, recent)
    hit = _HISTORY.get(key)
    if hit is not None:
        _HISTORY.move_to_end(key)
        HISTORY_STATS["hits"] += 1
        return hit
    HISTORY_STATS["misses"] += 1
    computed = indicators_compute(frame) if not frame.empty else None
    series = TimeframeSeries(timeframe=timeframe, candles=frame, computed=computed, window=window, recent=recent)
    _HISTORY[key] = (frame, computed, series)
    while len(_HISTORY) > HISTORY_CACHE_SIZE:
        _HISTORY.popitem(last=False)
    return frame, computed, series


class FrameSnapshots:
    """Snapshots from frames and indicators computed once over the whole replay history.

    A timeframe's view only changes when one of its candles closes, so each view is
    built once per closed candle (`market.snapshot.TimeframeSeries`, equal to what
    `timeframe_view` gives at that time) and reused by the cycles in between (a 4H
    view serves 48 five-minute cycles).
    """

    def __init__(self, feed: Any, inst_id: str, until: datetime) -> None:
        self.feed = feed
        self.inst_id = inst_id
        self.window = int(settings.INDICATOR_HISTORY_CANDLES)
        recent = int(settings.SNAPSHOT_RECENT_CANDLES)
        feed.set_clock(until)
        self.frames: dict[str, pd.DataFrame | None] = {}
        self.computed: dict[str, pd.DataFrame] = {}
        self.series: dict[str, Any] = {}  # tf -> market.snapshot.TimeframeSeries
        self._views: dict[str, tuple[int, Any]] = {}  # tf -> (closed candle count, its TimeframeView)
        for tf in settings.TIMEFRAMES:
            frame, computed, series = timeframe_history(inst_id=inst_id, timeframe=tf, recent=recent,
                                                        frame=feed.frame(inst_id, tf, limit=10_000_000),
                                                        window=self.window)
            self.frames[tf] = frame
            if computed is not None:
                self.computed[tf] = computed
            self.series[tf] = series

    def views_at(self, as_of: datetime) -> dict[str, Any]:
        from market.snapshot import epoch_ns

        now_ns = epoch_ns(as_of)  # once for every timeframe
        views = {}
        for tf, series in self.series.items():
            end = series.closed_count_ns(now_ns)
            known = self._views.get(tf)
            if known is None or known[0] != end:
                known = (end, series.view(end, as_of))
                self._views[tf] = known
            views[tf] = known[1]
        return views

    def closed_counts(self) -> tuple[int, ...]:
        """How many candles of each timeframe had closed at the last `views_at`: what its views depend on."""
        return tuple(known[0] for known in self._views.values())

    def __call__(self, inst_id: str, as_of: datetime) -> MarketSnapshot:
        from market.snapshot import snapshot_from_frames

        feed = self.feed
        feed.set_clock(as_of)
        oi = feed.open_interest(inst_id)
        history = getattr(feed, "open_interest_at", None)
        oi_ago = history(inst_id, as_of - _FOUR_HOURS) if oi is not None and callable(history) else None
        ours = inst_id == self.inst_id
        return snapshot_from_frames(
            inst_id=inst_id, as_of=as_of, source=getattr(feed, "name", "replay"), candles=self.frames,
            computed=self.computed, ticker=feed.ticker(inst_id), order_book=feed.order_book(inst_id, 5),
            funding=feed.funding_rate(inst_id), open_interest=oi, open_interest_4h_ago=oi_ago, window=self.window,
            # The series wrap these very frames: their numpy arrays answer the 1H change without pandas.
            views=self.views_at(as_of) if ours else None, series=self.series if ours else None,
        )

