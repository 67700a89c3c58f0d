"""`manage.py demo` (`make demo`): the bot trading on a fresh machine with no keys and no internet.

Migrates, syncs instruments and backfills candles, starts a REAL Celery worker
(all queues) on the embedded filesystem broker, and drives the real pipeline
tasks on an accelerated virtual clock over the synthetic market: beat's task
(`cycle_start`) per virtual tick, account sync after each cycle, post-trade
reviews on the reflection queue. It stops once trades have opened and closed
and a reflection ran (or at the time budget), then prints the summary and how
to browse the journal in the admin.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Sum

INST = "BTC-USDT-SWAP"
# A stretch of the seeded synthetic market with trades that open and close within a virtual day or two.
DEMO_START = datetime(2025, 9, 1, tzinfo=UTC)


class Command(BaseCommand):
    help = "Set everything up and watch the bot trade (synthetic market, paper exchange, rules brain)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--budget", type=float, default=210.0, help="wall-clock seconds for the trading part")
        parser.add_argument("--step", default="15m", help="virtual time between cycles (5m, 15m, 1H)")
        parser.add_argument("--trades", type=int, default=2, help="stop after this many closed trades (and a review)")

    def handle(self, *args: Any, **opts: Any) -> None:
        from market.models import TIMEFRAME_SECONDS

        if opts["step"] not in TIMEFRAME_SECONDS:
            raise CommandError(f"--step must be one of {', '.join(TIMEFRAME_SECONDS)}")
        began = time.monotonic()
        out = self.stdout.write
        out("1/4 database: " + str(settings.DATABASES["default"]["NAME"]))
        call_command("migrate", verbosity=0, interactive=False)
        self._fresh_state()
        out("2/4 market data")
        instrument = self._market()
        out("3/4 starting Celery workers on the embedded broker")
        workers = self._start_worker()
        try:
            out(f"4/4 trading on a virtual clock from {DEMO_START:%Y-%m-%d} in {opts['step']} steps (budget {opts['budget']:.0f}s)")
            self._trade(instrument, step=timedelta(seconds=TIMEFRAME_SECONDS[opts["step"]]),
                        budget=opts["budget"], trades=opts["trades"])
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        self._summary(time.monotonic() - began)

    # --- setup ------------------------------------------------------------------

    def _fresh_state(self) -> None:
        """A demo starts from an empty live journal and a fresh paper account."""
        from execution.models import BotState, Order, PaperAccount
        from journal.models import Cycle, Mode, Trade

        Trade.objects.filter(mode=Mode.LIVE).delete()
        Order.objects.filter(mode=Mode.LIVE).delete()
        Cycle.objects.filter(mode=Mode.LIVE).delete()
        PaperAccount.objects.filter(name="default").delete()
        BotState.objects.all().delete()

    def _market(self) -> Any:
        from market.feeds import feed_from_settings
        from market.feeds.synthetic import SyntheticFeed
        from market.services import candles_backfill, instruments_sync

        probe = feed_from_settings(source="auto")
        if probe.name == "okx" or getattr(probe, "source", "") == "okx":
            self.stdout.write("   OKX public data is reachable; the demo still replays the synthetic market on its "
                              "virtual clock (`make run` trades on OKX data)")
        else:
            self.stdout.write("   OKX is not reachable: using the synthetic market (seed "
                              f"{settings.SYNTHETIC_SEED})")
        feed = SyntheticFeed()
        feed.set_clock(DEMO_START)
        instruments_sync(feed=feed, enable=[INST])
        from market.models import Instrument

        instrument = Instrument.objects.get(inst_id=INST)
        stored = sum(candles_backfill(feed=feed, instrument=instrument, timeframe=tf, limit=300) for tf in settings.TIMEFRAMES)
        self.stdout.write(f"   {INST}: {stored} candles backfilled (15m/1H/4H up to {DEMO_START:%Y-%m-%d})")
        return instrument

    def _start_worker(self) -> list[subprocess.Popen[bytes]]:
        """Two real workers on the embedded broker: the cycle queues, and reflection.

        Reflection (reviews, deep reflection, the validation replays of a new
        playbook) gets its own process so it never holds up a trading cycle,
        as in the full stack where each queue has its own worker.
        """
        from tradebot.controls import broker_dirs_ensure

        broker_dirs_ensure()
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
        env.update({"MARKET_DATA_SOURCE": "synthetic", "BRAIN": env.get("BRAIN", "auto")})
        # The demo covers a few virtual days: validate a new playbook on the last 3 of them.
        env.setdefault("PLAYBOOK_VALIDATION_DAYS", "3")
        env.setdefault("PLAYBOOK_VALIDATION_CYCLE_SECONDS", "900")
        procs = []
        for name, queues in (("demo", "okx,llm,default"), ("demo-reflection", "reflection")):
            log_path = Path(settings.VAR_DIR) / f"{name}-worker.log"
            log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tradebot", "worker", "-Q", queues,
                 "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
                 "-n", f"{name}@%h"],
                cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            procs.append(proc)
            self._wait_ready(proc, log_path, procs)
            self.stdout.write(f"   worker {name} ({queues}) ready (log: {log_path})")
        return procs

    def _wait_ready(self, proc: subprocess.Popen[bytes], log_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if b"ready." in log_path.read_bytes():
                return
            if proc.poll() is not None:
                for p in procs:
                    p.kill()
                raise CommandError(f"the worker exited: {log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        for p in procs:
            p.kill()
        raise CommandError("the worker did not start within 90 s")

    # --- trading ----------------------------------------------------------------

    def _trade(self, instrument: Any, *, step: timedelta, budget: float, trades: int) -> None:
        from journal.models import Cycle, Mode, ReflectionLog, Trade
        from tradebot.celery import app
        from tradebot.tasks import cycle_start

        started = time.monotonic()
        t = DEMO_START
        n = 0
        while time.monotonic() - started < budget:
            t += step
            # Beat's task, with the virtual time: it opens the cycle and sends the chain to the queues.
            cycle_start.apply_async(args=[INST], kwargs={"as_of": t.isoformat(), "trigger": "demo"}, queue="default")
            if not self._wait_cycle(t, timeout=60):
                self.stderr.write(f"   cycle at {t:%Y-%m-%d %H:%M} did not finish in 60 s; see the worker log")
                break
            app.signature("tradebot.tasks.account_sync").set(queue="okx").apply_async()
            n += 1
            closed = Trade.objects.filter(mode=Mode.LIVE, status="closed").count()
            reviews = ReflectionLog.objects.filter(reflection_type="post_trade").exclude(status="requested").count()
            if n % 10 == 0:
                last = Cycle.objects.filter(mode=Mode.LIVE).order_by("-as_of").first()
                self.stdout.write(f"   {t:%Y-%m-%d %H:%M}  cycles {n}  trades closed {closed}  "
                                  f"last: {last.outcome if last else '-'}")
            if closed >= trades and reviews >= 1:
                break
        time.sleep(2)  # the last account sync and reviews

    def _wait_cycle(self, as_of: datetime, *, timeout: float) -> bool:
        from journal.models import TERMINAL_CYCLE_STATES, Cycle, Mode

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cycle = Cycle.objects.filter(mode=Mode.LIVE, as_of=as_of).order_by("-id").first()
            if cycle is not None and cycle.state in TERMINAL_CYCLE_STATES:
                return True
            time.sleep(0.02)
        return False

    # --- summary ----------------------------------------------------------------

    def _summary(self, elapsed: float) -> None:
        from journal.models import Cycle, Mode, ReflectionLog, Trade

        cycles = Cycle.objects.filter(mode=Mode.LIVE)
        outcomes = dict(cycles.values_list("outcome").annotate(n=Count("id")))
        closed = Trade.objects.filter(mode=Mode.LIVE, status="closed")
        pnl = closed.aggregate(v=Sum("pnl_usd"))["v"] or 0
        w = self.stdout.write
        w("")
        w(f"demo finished in {elapsed:.0f}s")
        w(f"cycles     {cycles.count()}  {outcomes}")
        w(f"trades     {Trade.objects.filter(mode=Mode.LIVE).count()} opened, {closed.count()} closed, PnL {pnl:.2f} USDT")
        w(f"reflection {ReflectionLog.objects.count()} entries "
          f"({ReflectionLog.objects.filter(reflection_type='post_trade').count()} post-trade)")
        w("")
        w("Browse the journal: `make web` (or `.venv/bin/python manage.py runserver 127.0.0.1:8000`),")
        w("then open http://127.0.0.1:8000/admin/ (create a login first: `.venv/bin/python manage.py createsuperuser`).")
