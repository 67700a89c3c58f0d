"""`manage.py stream_okx`: OKX's public, business and (with keys) private WebSockets in one process.

Connections (each an `market.streams.okx_ws.OkxStream`, reconnecting on its own):
- public   /ws/v5/public   tickers, books5, funding-rate, open-interest of the enabled instruments;
- business /ws/v5/business candles of the cycle's timeframes;
- private  /ws/v5/private  login; orders, positions, account      (only with OKX_API_KEY & co);
- algo     /ws/v5/business login; orders-algo                      (only with keys).

This module wires the apps together (only `tradebot` may import them all): the public handler
(market) writes the candle store and the live market rows; its triggers (the 1H move; the position
watch's levels, read here from the journal every POSITIONS_EVERY s) start a cycle through
`cycle_launch` (trigger "stream"); the private handler (execution) queues the account sync
(tradebot.tasks.account_sync, orders queue), which journals closes and asks for their reviews;
every problem a connection reports is a JournalEvent with the raw text (secrets redacted).

Threads: the event loop only receives, validates and keeps. Database writes run on one
database thread (ordered), REST gap fills on another (they wait on OKX's rate limits), task
sends on a third (a slow broker must not hold the candle writes).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.db import OperationalError, close_old_connections, connections

from execution.streams import ALGO_ARGS, PRIVATE_ARGS, PrivateStreamHandler
from journal.models import EventLevel
from journal.services import event_record
from market.models import Instrument, StreamStatus
from market.streams.okx_ws import Credentials, OkxStream, StreamState
from market.streams.public import PublicStreamHandler, candle_args, candles_gap_fill, live_batch_write, public_args
from market.streams.triggers import PositionLevels
from tradebot.logging import get_logger, redact

log = get_logger(__name__)
ACCOUNT_SYNC_TASK = "tradebot.tasks.account_sync"
STATUS_EVERY = 2.0  # seconds between status writes
POSITIONS_EVERY = 5.0  # seconds between reads of the position watch's levels (open trades, last review, ATR)
LOCKED_RETRIES = 20  # SQLite lock waits of 0.05 s, 0.1 s, ...: about 10 s in all before a write is given up


def stream_urls(base: str | None = None) -> dict[str, str]:
    host = (base if base is not None else settings.OKX_WS_URL).rstrip("/") or (
        "wss://wspap.okx.com:8443" if settings.OKX_DEMO else "wss://ws.okx.com:8443")
    return {"public": f"{host}/ws/v5/public", "business": f"{host}/ws/v5/business", "private": f"{host}/ws/v5/private"}


def credentials_from_settings() -> Credentials | None:
    if settings.OKX_API_KEY and settings.OKX_API_SECRET and settings.OKX_PASSPHRASE:
        return Credentials(api_key=settings.OKX_API_KEY, secret=settings.OKX_API_SECRET,
                           passphrase=settings.OKX_PASSPHRASE)
    return None


def stream_problem_record(*, kind: str, message: str, raw: str, level: str, stream: str) -> None:
    """A connection's problem as a journal line; the raw text in `data` (redacted again: env secrets)."""
    event_record(kind=kind[:40], message=message, level=EventLevel.ERROR if level == "error" else EventLevel.WARNING,
                 data={"stream": stream, "raw": redact(raw)})


def stream_cycle_start(*, inst_id: str, reason: str) -> int | None:
    """A stream trigger fired: open the instrument's cycle now (or record why not), send its chain."""
    from tradebot.pipeline import cycle_launch

    instrument = Instrument.objects.filter(inst_id=inst_id, trading_enabled=True).first()
    if instrument is None:
        return None
    cycle = cycle_launch(instrument=instrument, trigger="stream", mode=settings.BOT_MODE)
    event_record(kind="stream_trigger", message=f"{inst_id}: {reason}; cycle {cycle.pk} {cycle.state}",
                 instrument_id=instrument.pk, cycle_id=cycle.pk)
    return cycle.pk


def position_levels_read(*, inst_ids: list[str], mode: str) -> dict[str, PositionLevels]:
    """The position watch's levels of each instrument with a trade open (database thread).

    Review price: the analyst's last review (brain.watch.review_mark_last), else the entry. ATR: the
    instrument's last full snapshot (brain.watch.snapshot_atr), else 1% of the price, as the watch does.
    Nothing when the position watch is off (POSITION_WATCH_ENABLED).
    """
    from brain.watch import review_mark_last, snapshot_atr
    from journal.models import Cycle, Trade, TradeStatus
    from market.schemas import MarketSnapshot

    if not settings.POSITION_WATCH_ENABLED:
        return {}
    now = datetime.now(UTC)
    found: dict[str, PositionLevels] = {}
    trades = (Trade.objects.filter(mode=mode, run_id="", status=TradeStatus.OPEN, instrument__inst_id__in=inst_ids)
              .select_related("instrument").order_by("opened_at"))
    for trade in trades:
        inst_id = trade.instrument.inst_id
        mark = review_mark_last(inst_id=inst_id, mode=mode, run_id="", before=now)
        review = float(mark.price if mark is not None else trade.entry_price)
        atr = review * 0.01
        snap = (Cycle.objects.filter(instrument=trade.instrument, mode=mode, run_id="", snapshot__isnull=False)
                .order_by("-id").values_list("snapshot", flat=True).first())
        if snap and not snap.get("compact"):
            try:
                atr = float(snapshot_atr(MarketSnapshot.model_validate(snap)))
            except ValueError:
                pass  # a snapshot of an older shape: the watch's own fallback (1% of the price)
        found[inst_id] = PositionLevels(
            review_price=review, atr=atr, stop_loss=float(trade.stop_loss) if trade.stop_loss else None,
            take_profit=float(trade.take_profit) if trade.take_profit else None,
            atr_multiple=float(settings.POSITION_WATCH_ATR_MULTIPLE),
            near_atr=float(settings.POSITION_WATCH_SLTP_NEAR_ATR))
    return found


def account_sync_send(reason: str) -> None:
    from tradebot.celery import app

    app.signature(ACCOUNT_SYNC_TASK).set(queue="orders").apply_async()


def stream_status_write(states: list[StreamState], *, at: float) -> None:
    def ts(value: float | None) -> datetime | None:
        return datetime.fromtimestamp(value, tz=UTC) if value is not None else None

    rows = [StreamStatus(
        name=s.name, url=s.url, connected=s.connected, stopped=s.stopped, connected_at=ts(s.connected_at),
        last_message_at=ts(s.last_message_at), reconnects=s.reconnects, messages=s.messages, error=redact(s.error),
        last_by_channel={c: ts(t).isoformat() for c, t in sorted(s.last_by_channel.items())},  # type: ignore[union-attr]
        updated_at=ts(at)) for s in states]
    StreamStatus.objects.bulk_create(rows, update_conflicts=True, unique_fields=["name"], update_fields=[
        "url", "connected", "stopped", "connected_at", "last_message_at", "last_by_channel", "reconnects", "messages",
        "error", "updated_at"])


class StreamApp:
    """The process: its connections, their handlers and the write loop."""

    def __init__(self, *, inst_ids: list[str] | None = None, ws_base: str | None = None,
                 credentials: Credentials | None | bool = True, rest_feed: Any = None,
                 flush_seconds: float | None = None, gap_fill_limit: int | None = None) -> None:
        self.inst_ids = inst_ids
        self.urls = stream_urls(ws_base)
        self.credentials = credentials_from_settings() if credentials is True else credentials or None
        self.rest_feed = rest_feed
        self.flush_seconds = flush_seconds if flush_seconds is not None else settings.STREAM_FLUSH_SECONDS
        self.gap_fill_limit = gap_fill_limit or settings.INDICATOR_HISTORY_CANDLES
        self.streams: dict[str, OkxStream] = {}
        self.instruments: dict[str, Instrument] = {}
        self.public: PublicStreamHandler | None = None
        self.private: PrivateStreamHandler | None = None
        self._db = ThreadPoolExecutor(1, thread_name_prefix="stream-db")
        self._rest = ThreadPoolExecutor(1, thread_name_prefix="stream-rest")
        self._send = ThreadPoolExecutor(1, thread_name_prefix="stream-send")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self.gap_fills = 0

    # -- work on the threads ------------------------------------------------------------------------
    def _in(self, pool: ThreadPoolExecutor, fn: Any, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        assert self._loop is not None

        def run() -> Any:
            close_old_connections()
            for attempt in range(LOCKED_RETRIES + 1):
                try:
                    return fn(*args, **kwargs)
                except OperationalError as exc:
                    # SQLite answers a concurrent writer with "database is locked" / "table is locked" at
                    # once (shared cache ignores the busy timeout): a trigger dropped on that is a lost
                    # cycle, so wait and try again; other database errors are not transient here.
                    if "locked" not in str(exc) or attempt == LOCKED_RETRIES:
                        log.error("stream_thread_failed", what=getattr(fn, "__name__", str(fn)), error=redact(str(exc)))
                        return None
                    time.sleep(0.05 * (attempt + 1))
                except Exception as exc:  # noqa: BLE001 - a failed write is logged; the stream goes on
                    log.error("stream_thread_failed", what=getattr(fn, "__name__", str(fn)), error=redact(str(exc)))
                    return None
            return None

        return self._loop.run_in_executor(pool, run)

    def _problem(self, **report: Any) -> None:
        self._in(self._db, stream_problem_record, **report)

    def _trigger(self, inst_id: str, reason: str) -> None:
        self._in(self._db, stream_cycle_start, inst_id=inst_id, reason=reason)

    def _request_sync(self, reason: str) -> None:
        def send() -> None:
            try:
                account_sync_send(reason)
            except Exception as exc:  # noqa: BLE001 - the beat's sync runs anyway
                stream_problem_record(kind="stream_sync_not_sent", message=f"account sync not queued ({reason}): "
                                      f"{type(exc).__name__}: {exc}", raw="", level="error", stream="private")
        self._in(self._send, send)

    def _gap(self, stream: str, reconnect: bool) -> None:
        if stream != "business" or self.rest_feed is None:
            return
        instruments, public = list(self.instruments.values()), self.public
        assert public is not None and self._loop is not None

        def fill() -> None:
            candles_gap_fill(feed=self.rest_feed, instruments=instruments, timeframes=list(settings.TIMEFRAMES),
                             limit=self.gap_fill_limit)
            found = public.watches_read(instruments=self.instruments)
            self._loop.call_soon_threadsafe(public.watches_apply, found)  # type: ignore[union-attr]
            self.gap_fills += 1

        self._in(self._rest, fill)

    # -- set-up and the loop ----------------------------------------------------------------------------
    def _load(self) -> dict[str, Instrument]:
        rows = Instrument.objects.filter(trading_enabled=True)
        if self.inst_ids:
            rows = Instrument.objects.filter(inst_id__in=self.inst_ids)
        return {i.inst_id: i for i in rows}

    def build(self) -> None:
        inst_ids = sorted(self.instruments)
        timeframes = list(settings.TIMEFRAMES)
        common = {"on_problem": self._problem, "ping_after": settings.STREAM_PING_SECONDS,
                  "pong_timeout": min(5.0, settings.STREAM_PING_SECONDS),
                  "backoff_first": settings.STREAM_BACKOFF_FIRST_SECONDS, "backoff_max": settings.STREAM_BACKOFF_MAX_SECONDS}
        self.public = PublicStreamHandler(inst_ids=inst_ids, timeframes=timeframes,
                                          move_threshold=float(settings.ANOMALY_MOVE_1H_PCT),
                                          on_trigger=self._trigger, on_gap=self._gap)
        self.streams["public"] = OkxStream(name="public", url=self.urls["public"], args=public_args(inst_ids),
                                           handler=self.public, **common)
        self.streams["business"] = OkxStream(name="business", url=self.urls["business"],
                                             args=candle_args(inst_ids, timeframes), handler=self.public, **common)
        if self.credentials is not None:
            self.private = PrivateStreamHandler(request_sync=self._request_sync)
            self.streams["private"] = OkxStream(name="private", url=self.urls["private"], args=PRIVATE_ARGS,
                                                handler=self.private, credentials=self.credentials, **common)
            self.streams["algo"] = OkxStream(name="algo", url=self.urls["business"], args=ALGO_ARGS,
                                             handler=self.private, credentials=self.credentials, **common)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.instruments = await self._in(self._db, self._load) or {}
        if not self.instruments:
            log.warning("stream_no_instruments", reason="no instrument is enabled for trading")
        self.build()
        assert self.public is not None
        self.public.watches_apply(await self._in(self._db, self.public.watches_read, instruments=self.instruments) or {})
        await self.positions_refresh()
        log.info("stream_starting", instruments=sorted(self.instruments), streams=sorted(self.streams),
                 private=self.credentials is not None)
        tasks = [asyncio.ensure_future(self._after_login(s) if name == "algo" else s.run())
                 for name, s in self.streams.items()]
        writer = asyncio.ensure_future(self._write_loop())
        try:
            await self._stop.wait()
        finally:
            for stream in self.streams.values():
                stream.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await self._write(final=True)
            for pool in (self._db, self._rest, self._send):
                pool.submit(connections.close_all)  # each thread's own database session, before it ends
                pool.shutdown(wait=True, cancel_futures=False)

    def stop(self) -> None:
        self._stop.set()

    async def _after_login(self, stream: OkxStream) -> None:
        """The algo connection logs in only once the private one did: a bad key gives one refusal, not two."""
        private = self.streams["private"]
        while not private.logged_in.is_set():
            if private.state.stopped or self._stop.is_set():
                stream.state.stopped, stream.state.error = True, "not started: the private stream's login failed"
                return
            await asyncio.sleep(0.1)
        await stream.run()

    async def positions_refresh(self) -> None:
        """Read the position watch's levels (database thread) and hand them to the triggers (here, the loop)."""
        assert self.public is not None
        levels = await self._in(self._db, position_levels_read, inst_ids=sorted(self.instruments),
                                mode=settings.BOT_MODE)
        if levels is not None:  # None: the read failed (logged); keep the levels we had
            self.public.positions_apply(levels)

    async def _write_loop(self) -> None:
        last_status = last_positions = time.monotonic()
        while True:
            await asyncio.sleep(self.flush_seconds)
            status = time.monotonic() - last_status >= STATUS_EVERY
            await self._write(status=status)
            if status:
                last_status = time.monotonic()
            if time.monotonic() - last_positions >= POSITIONS_EVERY:
                last_positions = time.monotonic()
                await self.positions_refresh()

    async def _write(self, *, status: bool = True, final: bool = False) -> None:
        assert self.public is not None
        batch = self.public.batch_take()
        if batch:
            await self._in(self._db, partial(live_batch_write, batch=batch, instruments=self.instruments))
        if status or final:
            states = [s.state for s in self.streams.values()]
            if final:  # the process ends: no connection of it is up or coming back (bot status, health)
                for state in states:
                    state.connected = False
                    if not state.stopped:
                        state.stopped, state.error = True, "manage.py stream_okx stopped"
            await self._in(self._db, stream_status_write, states, at=time.time())

    async def flushed(self) -> None:
        """Write what the handlers hold now (tests, the benchmark)."""
        await self._write()
