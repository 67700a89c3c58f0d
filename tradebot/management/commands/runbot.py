"""`manage.py runbot` (`make run`): the bot on one machine without Docker.

One supervised process starts: one Celery worker per queue (okx, orders, llm,
reflection, default; the llm worker on a threads pool of LLM_WORKER_THREADS,
since a model call waits 1-60 s on the network, so an order, the account sync
and the risk gate never queue behind one; the orders worker, which places and
confirms orders and runs the account sync, with ORDERS_WORKER_CONCURRENCY
processes of its own, so neither waits behind a tick's COLLECTING tasks), Celery beat (database schedule,
synced from the enabled instruments), the admin on 127.0.0.1:8000 and, when
FLOWER_BASIC_AUTH is set, Flower on 127.0.0.1:5555 behind that basic auth; on
OKX data, `manage.py stream_okx` (OKX's WebSockets); with TELEGRAM_BOT_TOKEN,
`manage.py telegram`; on the embedded broker or Redis when REDIS_URL is set.
A child that dies is restarted. The first cycle of each instrument starts at once (beat's come every
DECISION_CYCLE_SECONDS after), and one compact line is printed per finished
cycle (instrument, outcome, decision, PnL of the trades it closed); routine task
lines are logged at DEBUG. Ctrl-C stops cleanly: the worker gets a warm shutdown
(the task in flight, an order included, finishes), then every cycle still
unfinished is recorded INTERRUPTED.

Market data: with MARKET_DATA_SOURCE=auto the bot needs OKX public data; when
OKX is unreachable it says so and retries (after `--retry-seconds`, doubling up
to a minute), it does not switch to synthetic data silently (set
MARKET_DATA_SOURCE=synthetic to trade the synthetic market). Nothing starts
before OKX answered; Ctrl-C while it waits just stops. Once running, a cycle
whose feed call fails on a temporary error is retried by its stage task
(`tradebot.tasks.stage_run`) and ends FAILED, journaled, when it keeps failing;
the next beat tick tries again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tradebot.celery import QUEUES


class Command(BaseCommand):
    help = "Run workers for all queues, beat and the admin (127.0.0.1:8000) until Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, default=1,
                            help="processes of each of the okx, reflection and default workers (llm: LLM_WORKER_THREADS "
                                 "threads; orders: --orders-concurrency)")
        parser.add_argument("--orders-concurrency", type=int, default=settings.ORDERS_WORKER_CONCURRENCY,
                            help="processes of the orders worker (default ORDERS_WORKER_CONCURRENCY)")
        parser.add_argument("--no-web", action="store_true", help="do not start the admin")
        parser.add_argument("--enable", default=",".join(settings.INSTRUMENTS), help="instruments to trade")
        parser.add_argument("--retry-seconds", type=float, default=5.0,
                            help="first wait before asking an unreachable OKX again (doubles, up to 60 s)")

    def handle(self, *args: Any, **opts: Any) -> None:
        from tradebot.beat import beat_sync
        from tradebot.controls import broker_dirs_ensure

        if opts["retry_seconds"] <= 0:
            raise CommandError("--retry-seconds must be positive")
        if opts["concurrency"] < 1 or opts["orders_concurrency"] < 1:
            raise CommandError("--concurrency and --orders-concurrency must be at least 1")
        broker_dirs_ensure()
        enable = [i for i in opts["enable"].split(",") if i]

        def interrupt(*_: Any) -> None:
            raise KeyboardInterrupt

        # Until the children start, a stop request (Ctrl-C, SIGTERM) just ends the wait for OKX.
        signal.signal(signal.SIGTERM, interrupt)
        try:
            source = self._market_source(enable=enable, retry_seconds=opts["retry_seconds"])
        except KeyboardInterrupt:
            self.stdout.write("stopped while waiting for OKX; nothing was started")
            return
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        # From here a stop request only sets the flag: children started so far are then stopped in order.
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        entries = beat_sync()
        self.stdout.write(f"beat: {len(entries)} entries ({', '.join(e.name for e in entries)})")
        env = {**os.environ, "MARKET_DATA_SOURCE": source}
        manage = [sys.executable, "manage.py"]
        celery = [sys.executable, "-m", "celery", "-A", "tradebot"]
        commands = worker_commands(celery, concurrency=opts["concurrency"], orders_concurrency=opts["orders_concurrency"])
        commands["beat"] = celery + ["beat", "-l", "INFO"]
        if not opts["no_web"]:
            commands["web"] = manage + ["runserver", "127.0.0.1:8000", "--noreload"]
        if source == "okx":  # OKX's WebSockets: fills, positions and sharp moves as they happen (issue 19)
            commands["stream"] = manage + ["stream_okx"]
        if settings.TELEGRAM_BOT_TOKEN:  # alerts and commands from a phone (issue 18)
            commands["telegram"] = manage + ["telegram"]
        if settings.FLOWER_BASIC_AUTH:
            # Flower reads FLOWER_BASIC_AUTH from the environment: the password never shows in `ps`.
            commands["flower"] = celery + ["flower", "--address=127.0.0.1", "--port=5555"]
        flower = "   flower: http://127.0.0.1:5555/" if "flower" in commands else ""
        self.stdout.write(f"broker: {settings.BROKER_KIND}   market data: {source}   admin: http://127.0.0.1:8000/admin/{flower}")
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for name, cmd in commands.items():
                procs[name] = subprocess.Popen(cmd, env=env, cwd=settings.BASE_DIR)
            self._first_cycles()
            feed = CycleLines(self.stdout.write)
            while not stopping:
                for name, proc in list(procs.items()):
                    if proc.poll() is not None and not stopping:
                        self.stderr.write(f"{name} exited with {proc.returncode}; restarting")
                        procs[name] = subprocess.Popen(commands[name], env=env, cwd=settings.BASE_DIR)
                feed.print_new()
                time.sleep(1)
        finally:
            self._shutdown(procs)

    def _first_cycles(self) -> None:
        """Each enabled instrument's first cycle now, not a cycle interval later (a duplicate with beat is SKIPPED)."""
        from market.models import Instrument
        from tradebot.celery import app

        inst_ids = list(Instrument.objects.filter(trading_enabled=True).values_list("inst_id", flat=True))
        for inst_id in inst_ids:
            app.send_task("tradebot.tasks.cycle_start", args=[inst_id], kwargs={"trigger": "start"}, queue="default")
        self.stdout.write(f"first cycle of {len(inst_ids)} instrument(s) started; then every {settings.DECISION_CYCLE_SECONDS}s")

    def _shutdown(self, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        from tradebot.cycle import cycle_interrupt_running

        self.stdout.write("stopping: beat first, then a warm worker shutdown (the task in flight finishes)")
        for name in ("beat", "stream", "telegram", "web", "flower"):
            proc = procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # Every worker gets its warm shutdown at once; each may take its task's time limit to finish it.
        workers = [proc for name, proc in procs.items() if name.startswith("worker-") and proc.poll() is None]
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            try:
                proc.wait(timeout=settings.CELERY_TASK_TIME_LIMIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        interrupted = self._interrupt_unfinished(cycle_interrupt_running)
        if interrupted is None:
            self.stderr.write("stopped; the database did not answer, unfinished cycles were not recorded INTERRUPTED "
                              "(the next start's stale sweep ends them)")
            return
        self.stdout.write(f"stopped; {len(interrupted)} unfinished cycle(s) recorded INTERRUPTED")

    def _interrupt_unfinished(self, interrupt: Any, *, wait_seconds: float = 30.0) -> list[int] | None:
        """Record unfinished cycles INTERRUPTED on a fresh connection, waiting up to 30 s for the database.

        The connection this process opened at start may be a session the server has since ended (a PostgreSQL
        restart while the bot ran): it is dropped first, never reused.
        """
        from django.db import InterfaceError, OperationalError, connections

        deadline = time.monotonic() + wait_seconds
        while True:
            connections.close_all()
            try:
                return interrupt(reason="runbot stopped (Ctrl-C) while the cycle ran")
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() > deadline:
                    return None
                self.stderr.write(f"database unavailable ({type(exc).__name__}); retrying in 2s")
                time.sleep(2)

    def _market_source(self, *, enable: list[str], retry_seconds: float) -> str:
        """OKX public data (waiting while unreachable) unless synthetic is asked for; syncs the instruments from it."""
        from market.feeds import okx_feed_from_settings
        from market.feeds.base import FeedError

        source = settings.MARKET_DATA_SOURCE
        if source == "replay":
            raise CommandError("MARKET_DATA_SOURCE=replay replays stored candles on a virtual clock (`manage.py demo`); "
                               "runbot trades the live market: use auto, okx or synthetic")
        if source == "synthetic":
            self.stdout.write("market data: the synthetic market (MARKET_DATA_SOURCE=synthetic)")
            self._instruments("synthetic", enable)
            return "synthetic"
        delay = retry_seconds
        while True:
            feed = okx_feed_from_settings(timeout=settings.MARKET_PROBE_TIMEOUT_SECONDS)
            try:
                feed.system_time()  # type: ignore[attr-defined]
                self._instruments("okx", enable)
                self.stdout.write(f"market data: OKX public data at {settings.OKX_BASE_URL}")
                return "okx"
            except FeedError as exc:
                self.stderr.write(f"OKX at {settings.OKX_BASE_URL} is unreachable ({exc}); retrying in {delay:g}s "
                                  "(set MARKET_DATA_SOURCE=synthetic to run on the synthetic market)")
            finally:
                feed.close()  # type: ignore[attr-defined]
            time.sleep(delay)
            delay = min(delay * 2, 60)

    def _instruments(self, source: str, enable: list[str]) -> None:
        from market.feeds import feed_from_settings
        from market.services import instruments_sync

        try:
            synced = instruments_sync(feed=feed_from_settings(source=source), enable=enable)
        except ValueError as exc:  # an instrument the venue does not offer: retrying will not help
            raise CommandError(str(exc)) from exc
        self.stdout.write(f"instruments: {len(synced)} synced, trading {', '.join(enable)}")


def worker_commands(celery: list[str], *, concurrency: int, orders_concurrency: int | None = None) -> dict[str, list[str]]:
    """One worker per queue: the llm one on a threads pool (I/O-bound model calls), the others prefork (their tasks'
    time limits need a child process to enforce them); the orders one with its own number of processes."""
    commands = {}
    for queue in QUEUES:
        if queue == "llm":
            pool = ["-P", "threads", "-c", str(settings.LLM_WORKER_THREADS)]
        elif queue == "orders":
            pool = ["-c", str(orders_concurrency or settings.ORDERS_WORKER_CONCURRENCY)]
        else:
            pool = ["-c", str(concurrency)]
        commands[f"worker-{queue}"] = celery + ["worker", "-Q", queue, *pool, "-l", "INFO", "-n", f"runbot-{queue}@%h"]
    return commands


class CycleLines:
    """One compact line per finished live cycle: time, instrument, outcome, decision, PnL of the trades it closed."""

    def __init__(self, write: Any) -> None:
        from django.utils import timezone

        self.write = write
        self.since = timezone.now()

    def print_new(self) -> None:
        from django.db import DatabaseError, close_old_connections
        from django.db.models import Sum

        from journal.models import Cycle, Mode, Trade

        # A request boundary for this long-lived loop: a session the server ended (a PostgreSQL restart) is
        # dropped and the next query connects again; without it every later read failed until runbot restarted.
        close_old_connections()
        try:
            ended = list(Cycle.objects.filter(mode=Mode.LIVE, ended_at__gt=self.since).select_related("instrument")
                         .order_by("ended_at", "id")[:200])
            for cycle in ended:
                action = ((cycle.decision or {}).get("decision") or {}).get("action") or "-"
                pnl = Trade.objects.filter(mode=Mode.LIVE, instrument=cycle.instrument, closed_at__gt=self.since,
                                           closed_at__lte=cycle.ended_at).aggregate(v=Sum("pnl_usd"))["v"]
                self.write(f"{cycle.as_of:%H:%M} {cycle.instrument.inst_id:<16} {cycle.outcome:<10} {action:<10} "
                           f"pnl {f'{pnl:+.2f}' if pnl is not None else '+0.00'}  {cycle.reason[:80]}")
                self.since = cycle.ended_at
        except DatabaseError as exc:  # the database is restarting: the lines come when it is back
            self.write(f"(cycle lines paused: {type(exc).__name__})")
