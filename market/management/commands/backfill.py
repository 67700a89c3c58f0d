"""`manage.py backfill --inst BTC-USDT-SWAP --tf 15m 1H 4H [--source okx|csv|synthetic] [--csv PATH]
[--since DATE | --limit N]`

Idempotent (a second run stores nothing twice) and resumable (it continues
from what is stored). The instrument is synced from the source first. On OKX
the requests are paced to the public rate limits and temporary errors retried.
With --csv the file's own timeframe is inferred from its spacing and coarser
timeframes are built from it; the instrument specs for a CSV come from the
database when already synced, else from the synthetic venue's OKX-shaped specs.
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from market.feeds import feed_from_settings
from market.feeds.base import FeedError, InstrumentSpec, MarketFeed
from market.models import TIMEFRAME_SECONDS, Instrument
from market.services import candles_backfill, instruments_sync


def parse_since(text: str) -> datetime:
    """An ISO date or datetime; naive values are UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"--since must be an ISO date like 2024-01-31 or 2024-01-31T12:00, got {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Command(BaseCommand):
    help = "Backfill closed candles for instruments and timeframes (idempotent, resumable)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--inst", nargs="+", default=None, help="instrument ids (default: settings.INSTRUMENTS)")
        parser.add_argument("--tf", nargs="+", default=None, choices=list(TIMEFRAME_SECONDS),
                            help="timeframes (default: 15m 1H 4H)")
        parser.add_argument("--source", choices=["okx", "csv", "synthetic"], default=None,
                            help="default: settings.MARKET_DATA_SOURCE (auto = OKX when reachable, else synthetic)")
        parser.add_argument("--csv", type=Path, default=None, help="candle CSV (ts,open,high,low,close,volume; ms)")
        window = parser.add_mutually_exclusive_group()
        window.add_argument("--since", type=parse_since, default=None, help="UTC date or datetime to start from")
        window.add_argument("--limit", type=int, default=None, help="the newest N bars per timeframe")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **opts: Any) -> None:
        source = opts["source"] or ("csv" if opts["csv"] else None)
        if opts["csv"] and source != "csv":
            raise CommandError("--csv goes with --source csv")
        if source == "csv" and not opts["csv"]:
            raise CommandError("--source csv needs --csv PATH")
        if opts["limit"] is not None and opts["limit"] <= 0:
            raise CommandError("--limit must be a positive number of bars")
        inst_ids: list[str] = opts["inst"] or list(settings.INSTRUMENTS)
        timeframes: list[str] = opts["tf"] or list(settings.TIMEFRAMES)
        if source == "csv" and len(inst_ids) != 1:
            raise CommandError("--csv holds one instrument: give exactly one --inst")
        since, limit = opts["since"], opts["limit"]
        if since is None and limit is None:
            limit = settings.INDICATOR_HISTORY_CANDLES

        try:
            feed = self._feed(source, opts["csv"], inst_ids[0])
            self.stdout.write(f"source: {feed.name}")
            instruments = self._instruments(feed, inst_ids)
            for inst in instruments:
                for tf in timeframes:
                    self._one(feed, inst, tf, since=since, limit=limit, quiet=opts["no_progress"])
        except FeedError as e:
            raise CommandError(f"{type(e).__name__}: {e}") from e
        except ValueError as e:
            raise CommandError(str(e)) from e

    def _feed(self, source: str | None, csv: Path | None, inst_id: str) -> MarketFeed:
        if source == "csv":
            from market.feeds.replay import ReplayFeed
            from market.feeds.synthetic import SPECS

            assert csv is not None
            stored = Instrument.objects.filter(inst_id=inst_id).first()
            spec = (InstrumentSpec(stored.inst_id, stored.inst_type, stored.ct_val, stored.lot_sz, stored.min_sz,
                                   stored.tick_sz, stored.max_lever, stored.settle_ccy, stored.state)
                    if stored else SPECS.get(inst_id))
            if spec is None:
                raise CommandError(f"no instrument specs for {inst_id}: sync it first (backfill --source okx)")
            feed = ReplayFeed.from_csv(csv, inst_id=inst_id, instrument=spec)
            feed.name = f"csv:{csv.name}"
            return feed
        return feed_from_settings(source=source)

    def _instruments(self, feed: MarketFeed, inst_ids: list[str]) -> list[Instrument]:
        offered = {s.inst_id for s in feed.instruments("SWAP")}
        unknown = sorted(set(inst_ids) - offered)
        if unknown:
            raise CommandError(f"{feed.name} does not offer {', '.join(unknown)}")
        synced = {i.inst_id: i for i in instruments_sync(feed=feed)}
        return [synced[i] for i in inst_ids]

    def _one(self, feed: MarketFeed, inst: Instrument, tf: str, *, since: datetime | None, limit: int | None,
             quiet: bool) -> None:
        step = TIMEFRAME_SECONDS[tf]
        if limit is not None:
            total = limit
        else:
            assert since is not None  # handle() passes one of the two
            total = max(0, int((feed.now() - since).total_seconds() // step))
        bar = tqdm(total=total, desc=f"{inst.inst_id} {tf}", unit="bar", disable=quiet, file=self.stderr._out)
        try:
            added = candles_backfill(feed=feed, instrument=inst, timeframe=tf, since=since, limit=limit,
                                     progress=bar.update)
        finally:
            bar.close()
        self.stdout.write(f"{inst.inst_id} {tf}: {added} new candles")
