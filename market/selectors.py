"""Reads for the market app (candles as frames, hourly returns, small lookups)."""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from market.models import TIMEFRAME_SECONDS, Candle, Instrument

FRAME_COLUMNS = ["open", "high", "low", "close", "volume"]


def instrument_get(*, inst_id: str) -> Instrument:
    """The stored instrument; `Instrument.DoesNotExist` names it when it was never synced."""
    try:
        return Instrument.objects.get(inst_id=inst_id)
    except Instrument.DoesNotExist:
        raise Instrument.DoesNotExist(f"instrument {inst_id} is not stored; run `manage.py backfill --inst {inst_id}` "
                                      "or sync the instruments first") from None


def instruments_enabled() -> list[Instrument]:
    return list(Instrument.objects.filter(trading_enabled=True))


def candles_frame(*, instrument: Instrument, timeframe: str, until: datetime | None = None,
                  limit: int = 1000) -> pd.DataFrame:
    """The newest `limit` confirmed bars closed by `until` (default: all stored), oldest first.

    UTC DatetimeIndex of open times named `ts`; float columns open/high/low/close/volume.
    """
    if timeframe not in TIMEFRAME_SECONDS:
        raise ValueError(f"unknown timeframe {timeframe!r}")
    rows = Candle.objects.filter(instrument=instrument, timeframe=timeframe, confirmed=True)
    if until is not None:
        rows = rows.filter(ts__lte=until - timedelta(seconds=TIMEFRAME_SECONDS[timeframe]))
    data = list(rows.order_by("-ts").values_list("ts", *FRAME_COLUMNS)[:limit])
    data.reverse()
    index = pd.DatetimeIndex([r[0] for r in data], name="ts")
    index = index.tz_convert("UTC") if index.tz is not None else index.tz_localize("UTC")
    values = np.array([r[1:] for r in data], dtype=float).reshape(len(data), len(FRAME_COLUMNS))
    return pd.DataFrame(values, index=index, columns=FRAME_COLUMNS)


def candle_latest_ts(*, instrument: Instrument, timeframe: str, confirmed: bool = True) -> datetime | None:
    row = (Candle.objects.filter(instrument=instrument, timeframe=timeframe, confirmed=confirmed)
           .order_by("-ts").values_list("ts", flat=True).first())
    return row


def _hourly_closes(instrument: Instrument, start: datetime, until: datetime) -> dict[datetime, float]:
    """Closes keyed by close time on the hour, from 1H bars or else the finest stored timeframe."""
    for tf in ("1H", "15m", "5m", "1m"):
        step = timedelta(seconds=TIMEFRAME_SECONDS[tf])
        rows = list(Candle.objects.filter(instrument=instrument, timeframe=tf, confirmed=True,
                                          ts__gte=start - step, ts__lte=until - step)
                    .values_list("ts", "close"))
        closes = {ts + step: float(close) for ts, close in rows
                  if (ts + step).minute == 0 and (ts + step).second == 0}
        if len(closes) >= 2:
            return closes
    return {}


def returns_1h(*, inst_ids: list[str], until: datetime, hours: int = 168) -> dict[str, list[float]]:
    """Simple 1-hour returns over the `hours` before `until`, for correlation checks.

    All lists are aligned on the same hours: only hours where every
    instrument has both closes are kept (missing instruments get []).
    """
    start = until - timedelta(hours=hours)
    closes: dict[str, dict[datetime, float]] = {}
    for inst in Instrument.objects.filter(inst_id__in=inst_ids):
        closes[inst.inst_id] = _hourly_closes(inst, start, until)
    found = [c for c in closes.values() if c]
    common = sorted(set.intersection(*(set(c) for c in found))) if found else []
    pairs = [(a, b) for a, b in zip(common, common[1:]) if b - a == timedelta(hours=1)]
    result: dict[str, list[float]] = {}
    for inst_id in inst_ids:
        c = closes.get(inst_id) or {}
        result[inst_id] = [c[b] / c[a] - 1.0 for a, b in pairs] if c else []
    return result


def streams_health(*, now: datetime | None = None, fresh_seconds: int | None = None) -> dict[str, object]:
    """`manage.py stream_okx`'s health, for the health check and `bot status` (one small read, no side effects).

    {"running": any status written within STREAM_FRESH_SECONDS, "ok": running and no problem,
     "problems": one line per connection that is not up (stopped for good, disconnected, or its
     status too old: the process is not running), "streams": {name: "up" | the problem}}.
    No row at all: the stream never ran here (MARKET_DATA_SOURCE is not okx): not running, no problem.
    """
    from django.conf import settings
    from django.utils import timezone

    from market.models import StreamStatus

    now = now or timezone.now()
    fresh = timedelta(seconds=fresh_seconds or settings.STREAM_FRESH_SECONDS)
    streams: dict[str, str] = {}
    running = False
    for row in StreamStatus.objects.all():
        age = (now - row.updated_at).total_seconds()
        running = running or age <= fresh.total_seconds()
        if age > fresh.total_seconds():
            streams[row.name] = f"{row.name}: status {age:.0f}s old (manage.py stream_okx is not running)"
        elif row.stopped:
            streams[row.name] = f"{row.name}: stopped: {row.error[:200]}"
        elif not row.connected:
            streams[row.name] = (f"{row.name}: disconnected, reconnecting ({row.reconnects} reconnects)"
                                 + (f": {row.error[:200]}" if row.error else ""))
        else:
            streams[row.name] = "up"
    problems = [v for v in streams.values() if v != "up"]
    return {"running": running, "ok": running and not problems, "problems": problems, "streams": streams}
