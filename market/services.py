"""Writes for the market app: instruments from the venue, candles into the database.

All candle writes are bulk upserts on the unique (instrument, timeframe, ts)
constraint, so running anything twice stores nothing twice. A confirmed
(closed) bar is never overwritten by an unconfirmed one (the upsert's own
condition). No database transaction is held across a feed call: each page is
fetched, then written.
"""
from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from market.feeds.base import Bar, FeedError, FeedTemporaryError, MarketFeed
from market.models import TIMEFRAME_SECONDS, Candle, Instrument
import structlog

log = structlog.get_logger(__name__)
BACKFILL_PAGE = 300
_CANDLE_FIELDS = ["open", "high", "low", "close", "volume", "confirmed"]
_INSTRUMENT_FIELDS = ["inst_type", "ct_val", "lot_sz", "min_sz", "tick_sz", "max_lever", "settle_ccy", "state",
                      "updated_at"]


def instruments_sync(*, feed: MarketFeed, enable: list[str] | None = None) -> list[Instrument]:
    """Store the feed's SWAP instruments (insert or update their specs); mark `enable` ones tradable.

    Returns the stored rows for every instrument the feed offered. Asking to
    enable an instrument the feed does not offer is an error (nothing is
    half-enabled).
    """
    specs = feed.instruments("SWAP")
    offered = {s.inst_id for s in specs}
    missing = sorted(set(enable or []) - offered)
    if missing:
        raise ValueError(f"{feed.name} does not offer {', '.join(missing)}")
    rows = [
        Instrument(inst_id=s.inst_id, inst_type=s.inst_type, ct_val=s.ct_val, lot_sz=s.lot_sz, min_sz=s.min_sz,
                   tick_sz=s.tick_sz, max_lever=s.max_lever, settle_ccy=s.settle_ccy or "USDT", state=s.state)
        for s in specs
    ]
    Instrument.objects.bulk_create(rows, batch_size=500, update_conflicts=True, unique_fields=["inst_id"],
                                   update_fields=_INSTRUMENT_FIELDS)
    if enable:
        Instrument.objects.filter(inst_id__in=enable).update(trading_enabled=True)
    log.info("instruments.synced", source=feed.name, count=len(rows), enabled=enable or [])
    return list(Instrument.objects.filter(inst_id__in=offered))


def candles_upsert(*, instrument: Instrument, timeframe: str, bars: list[Bar]) -> int:
    """Insert or update `bars`; returns how many rows were written (inserted or updated).

    Within the batch the last bar per ts wins, a confirmed one over an
    unconfirmed one; an unconfirmed bar whose ts is already stored confirmed
    is dropped, so a closed bar is never reopened.
    """
    return candles_upsert_many(instrument=instrument, bars_by_timeframe={timeframe: bars})


def candles_upsert_many(*, instrument: Instrument, bars_by_timeframe: dict[str, list[Bar]]) -> int:
    """`candles_upsert` for several timeframes at once: one INSERT statement per UPSERT_BATCH rows.

    The rule "a closed bar is never reopened" is the statement's own
    `ON CONFLICT ... DO UPDATE ... WHERE`: a stored confirmed row is updated
    only by a confirmed bar, so no read comes first and two writers cannot
    race between a read and a write. A statement in autocommit is its own
    transaction (no BEGIN/COMMIT round trips); both PostgreSQL (TimescaleDB
    too) and SQLite >= 3.24 speak this upsert. Returns the rows written (a
    bar dropped by the rule is not counted).
    """
    rows: list[tuple[object, ...]] = []
    for timeframe, bars in bars_by_timeframe.items():
        if timeframe not in TIMEFRAME_SECONDS:
            raise ValueError(f"unknown timeframe {timeframe!r}")
        by_ts: dict[datetime, Bar] = {}
        for bar in bars:
            if bar.ts.tzinfo is None:
                raise ValueError("candle times must be timezone-aware (UTC)")
            current = by_ts.get(bar.ts)
            if current is None or bar.confirmed or not current.confirmed:
                by_ts[bar.ts] = bar
        # One row per (timeframe, ts) in a statement: ON CONFLICT may not touch a row twice. Values in
        # _CANDLE_INSERT_FIELDS order (no model instances: building them cost more than the statement).
        rows.extend((instrument.pk, timeframe, b.ts, b.open, b.high, b.low, b.close, b.volume, b.confirmed)
                    for b in sorted(by_ts.values(), key=lambda b: b.ts))
    written = 0
    for i in range(0, len(rows), UPSERT_BATCH):
        written += _candles_upsert_statement(rows[i:i + UPSERT_BATCH])
    return written


UPSERT_BATCH = 500
_CANDLE_INSERT_FIELDS = ["instrument", "timeframe", "ts", *_CANDLE_FIELDS]


def _candles_upsert_statement(rows: list[tuple[object, ...]]) -> int:
    """One INSERT ... ON CONFLICT DO UPDATE ... WHERE for `rows`; the values prepared as the ORM prepares them.

    PostgreSQL gets one typed array per column (`SELECT * FROM UNNEST(...)`, as Django's own bulk
    insert does there): nine parameters instead of nine per row, about half the statement's cost for
    a sync's 30 bars. SQLite gets a VALUES list.
    """
    from django.db import DEFAULT_DB_ALIAS, connections

    connection = connections[DEFAULT_DB_ALIAS]  # the wrapper itself: the `connection` proxy costs per value prepared
    fields = [Candle._meta.get_field(name) for name in _CANDLE_INSERT_FIELDS]
    if connection.vendor == "postgresql":
        params: list[object] = [[f.get_db_prep_save(row[i], connection) for row in rows] for i, f in enumerate(fields)]
        source = "SELECT * FROM UNNEST(" + ", ".join(f"%s::{f.db_type(connection)}[]" for f in fields) + ")"
    else:
        params = [f.get_db_prep_save(value, connection) for row in rows for f, value in zip(fields, row, strict=True)]
        source = "VALUES " + ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(rows))
    qn = connection.ops.quote_name
    table = qn(Candle._meta.db_table)
    confirmed = qn(Candle._meta.get_field("confirmed").column)
    unique = ", ".join(qn(Candle._meta.get_field(n).column) for n in ("instrument", "timeframe", "ts"))
    updates = ", ".join(f"{qn(Candle._meta.get_field(n).column)} = EXCLUDED.{qn(Candle._meta.get_field(n).column)}"
                        for n in _CANDLE_FIELDS)
    sql = (
        f"INSERT INTO {table} ({', '.join(qn(f.column) for f in fields)}) {source} "
        f"ON CONFLICT ({unique}) DO UPDATE SET {updates} "
        f"WHERE NOT {table}.{confirmed} OR EXCLUDED.{confirmed}"
    )
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return max(cur.rowcount, 0)


def _stored_bounds(instrument: Instrument, timeframe: str) -> tuple[datetime | None, datetime | None]:
    from django.db.models import Max, Min

    agg = Candle.objects.filter(instrument=instrument, timeframe=timeframe, confirmed=True).aggregate(
        first=Min("ts"), last=Max("ts"))
    return agg["first"], agg["last"]


def _fetch(feed: MarketFeed, inst_id: str, timeframe: str, *, limit: int, before: datetime | None) -> list[Bar]:
    from market.feeds.okx import call_with_retries

    return call_with_retries(lambda: feed.candles(inst_id, timeframe, limit=limit, before=before),
                             what=f"{feed.name} candles {inst_id} {timeframe}")


def candles_backfill(
    *,
    feed: MarketFeed,
    instrument: Instrument,
    timeframe: str,
    since: datetime | None = None,
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Fill closed candles from `since` (or the last `limit` bars) up to the feed's clock.

    Resumable: it continues from what is stored. Bars newer than the newest
    stored one are fetched first (held in memory until they reach the stored
    bars, so an interruption cannot leave a hole), then it pages backwards
    from the oldest stored bar, writing each page as it arrives. Only
    confirmed bars are stored. Temporary feed errors are retried with
    backoff (OkxFeed also paces itself to OKX's rate limits). Returns the
    number of new rows. `progress(n)` is called with each page's bar count.
    """
    if (since is None) == (limit is None):
        raise ValueError("give exactly one of since or limit")
    if timeframe not in TIMEFRAME_SECONDS:
        raise ValueError(f"unknown timeframe {timeframe!r}")
    step = timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
    now = feed.now()
    if since is None:
        assert limit is not None
        if limit <= 0:
            raise ValueError("limit must be positive")
        since = now - step * (limit + 1)
    if since.tzinfo is None:
        raise ValueError("since must be timezone-aware (UTC)")
    count_before = Candle.objects.filter(instrument=instrument, timeframe=timeframe).count()
    first, last = _stored_bounds(instrument, timeframe)
    inst_id = instrument.inst_id

    def report(n: int) -> None:
        if progress is not None and n:
            progress(n)

    # 1. Newer than what is stored: page back from the clock to the newest stored bar (or `since`).
    #    With bars already stored, the new ones are held until they meet the stored ones (no hole if
    #    interrupted); with nothing stored, each page is written at once (the range stays contiguous).
    held: list[Bar] = []
    cursor: datetime | None = None
    while True:
        raw = _fetch(feed, inst_id, timeframe, limit=BACKFILL_PAGE, before=cursor)
        if not raw:
            break
        fresh = [b for b in raw if b.confirmed and b.ts >= since and (last is None or b.ts > last)]
        if last is None and fresh:
            candles_upsert(instrument=instrument, timeframe=timeframe, bars=fresh)
            first = fresh[0].ts
        else:
            held.extend(fresh)
        report(len(fresh))
        if raw[0].ts <= (last if last is not None else since):
            break
        cursor = raw[0].ts
    if held:
        candles_upsert(instrument=instrument, timeframe=timeframe, bars=held)

    # 2. Older than what is stored: page back from the oldest stored bar down to `since`.
    cursor = first
    while cursor is not None and cursor > since:
        raw = _fetch(feed, inst_id, timeframe, limit=BACKFILL_PAGE, before=cursor)
        if not raw:
            break
        page = [b for b in raw if b.confirmed and b.ts >= since]
        candles_upsert(instrument=instrument, timeframe=timeframe, bars=page)
        report(len(page))
        cursor = raw[0].ts
    added = Candle.objects.filter(instrument=instrument, timeframe=timeframe).count() - count_before
    log.info("candles.backfilled", source=feed.name, inst_id=inst_id, timeframe=timeframe, added=added,
             since=since.isoformat())
    return added


def candles_sync(*, feed: MarketFeed, instrument: Instrument, timeframes: list[str], limit: int) -> int:
    """Refresh the newest `limit` bars of each timeframe (the forming bar too, flagged unconfirmed).

    Returns the rows written. A temporary error on one timeframe is retried;
    if it persists it is raised after the other timeframes were written.
    """
    fetched: dict[str, list[Bar]] = {}
    failure: FeedError | None = None
    for tf in timeframes:
        try:
            fetched[tf] = _fetch(feed, instrument.inst_id, tf, limit=limit, before=None)
        except FeedTemporaryError as e:
            log.warning("candles.sync_failed", inst_id=instrument.inst_id, timeframe=tf, error=str(e))
            failure = e
    # Every timeframe fetched first (no transaction spans a feed call), then one statement writes them all.
    written = candles_upsert_many(instrument=instrument, bars_by_timeframe=fetched)
    if failure is not None:
        raise failure
    return written
