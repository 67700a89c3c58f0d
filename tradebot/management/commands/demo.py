"""`manage.py demo` (`make demo`): the bot trading on a fresh machine with no keys and no internet.

Migrates, syncs instruments and backfills candles, starts REAL Celery workers
on the embedded filesystem broker, and drives the real pipeline tasks on an
accelerated virtual clock: beat's task (`cycle_start`) per virtual tick,
account sync after each cycle, post-trade reviews on the reflection queue. It
stops once trades have opened and closed and a reflection ran (or at the time
budget, or at the end of the data), then prints the summary and how to
browse the journal in the admin.

The market (`--market`, default auto = OKX when reachable; it always says which):
- OKX public data: the recent history of the demo instrument (15m/1H/4H
  candles, enough for the indicator window before the walked days, and the
  funding history) is fetched through our OkxFeed and written as a replay
  directory (`market.feeds.replay.replay_dir_write`); the workers replay it
  (MARKET_DATA_SOURCE=replay) over the last `--days` days on the virtual clock.
- the synthetic market: a seeded stretch known to trade within a virtual day or two.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
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
# Days of recent OKX data the demo walks. Measured on the recorded OKX BTC-USDT-SWAP history
# (83 seven-day windows, 2024-04..2026-04, rules brain, 15m cycles): the second trade closed by day
# 0.8 in half of them and by day 3.6 in all; 7 days (672 cycles) still fits the time budget.
OKX_DAYS = 7
OKX_REPLAY_NAME = "okx-replay"
DEMO_ACCOUNT = "demo"  # the demo's paper account (`make run` trades "default")
MARKETS = ("auto", "okx", "synthetic")


@dataclass
class DemoMarket:
    """The market the demo trades and how its workers get the same data."""

    kind: str  # "okx" or "synthetic"
    feed: Any  # a virtual-clock feed (ReplayFeed / SyntheticFeed) for the set-up in this process
    start: datetime
    end: datetime | None  # the close of the last bar of the data (None: the synthetic market goes on)
    worker_env: dict[str, str]
    label: str


class Command(BaseCommand):
    help = ("Set everything up and watch the bot trade (paper exchange, rules brain; OKX public data when "
            "reachable, else the synthetic market).")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--budget", type=float, default=210.0, help="wall-clock seconds for the trading part")
        parser.add_argument("--step", default="15m", help="virtual time between cycles (5m, 15m, 1H)")
        parser.add_argument("--trades", type=int, default=2, help="stop after this many closed trades (and a review)")
        parser.add_argument("--market", choices=MARKETS, default=None,
                            help="auto: OKX public data when reachable, else the synthetic market "
                                 "(default: MARKET_DATA_SOURCE when it is one of these, else auto)")
        parser.add_argument("--days", type=float, default=OKX_DAYS,
                            help=f"OKX market: how many recent days to walk (default {OKX_DAYS})")

    def handle(self, *args: Any, **opts: Any) -> None:
        from market.models import TIMEFRAME_SECONDS

        if opts["step"] not in TIMEFRAME_SECONDS:
            raise CommandError(f"--step must be one of {', '.join(TIMEFRAME_SECONDS)}")
        if opts["days"] <= 0:
            raise CommandError("--days must be positive")
        choice = opts["market"] or (settings.MARKET_DATA_SOURCE if settings.MARKET_DATA_SOURCE in MARKETS else "auto")
        step = timedelta(seconds=TIMEFRAME_SECONDS[opts["step"]])
        began = time.monotonic()
        out = self.stdout.write
        out("1/4 database: " + str(settings.DATABASES["default"]["NAME"]))
        call_command("migrate", verbosity=0, interactive=False)
        out("2/4 market data")
        market = self._market(choice, days=timedelta(days=opts["days"]), step=step)
        # Only now that the market is settled (`--market okx` may stop above): the previous demo's journal goes.
        self._fresh_state()
        self._backfill(market)
        out("3/4 starting Celery workers on the embedded broker")
        workers = self._start_worker(market.worker_env)
        try:
            until = f" to {market.end:%Y-%m-%d %H:%M}" if market.end else ""
            out(f"4/4 trading {market.label} on a virtual clock from {market.start:%Y-%m-%d %H:%M}{until} "
                f"in {opts['step']} steps (budget {opts['budget']:.0f}s)")
            stop, walked = self._trade(start=market.start, end=market.end, step=step, budget=opts["budget"],
                                       trades=opts["trades"])
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            for worker in workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
        self._summary(time.monotonic() - began, market=market, stop=stop, walked=walked, trades=opts["trades"])

    # --- setup ------------------------------------------------------------------

    def _fresh_state(self) -> None:
        """A demo starts from an empty demo journal and a fresh demo paper account.

        Only the demo's own rows go: the live bot's journal, its paper account
        ("default", `make run`'s) and its bot state stay as they were.
        """
        from execution.models import DEMO_SCOPE, BotState, Order, PaperAccount
        from journal.models import Cycle, Mode, Trade

        Trade.objects.filter(mode=Mode.DEMO).delete()
        Order.objects.filter(mode=Mode.DEMO).delete()
        Cycle.objects.filter(mode=Mode.DEMO).delete()
        PaperAccount.objects.filter(name=DEMO_ACCOUNT).delete()
        BotState.objects.filter(scope=DEMO_SCOPE).delete()

    def _market(self, choice: str, *, days: timedelta, step: timedelta) -> DemoMarket:
        """OKX public data (auto: when reachable) or the synthetic market; says which, and why."""
        from market.feeds import okx_feed_from_settings
        from market.feeds.base import FeedError

        market: DemoMarket | None = None
        if choice == "synthetic":
            self.stdout.write("   the synthetic market (--market synthetic)")
        else:
            probe = okx_feed_from_settings(timeout=settings.MARKET_PROBE_TIMEOUT_SECONDS)
            try:
                probe.system_time()  # type: ignore[attr-defined]
                reachable: FeedError | None = None
            except FeedError as exc:
                reachable = exc
            finally:
                probe.close()  # type: ignore[attr-defined]
            if reachable is not None:
                if choice == "okx":
                    raise CommandError(f"OKX at {settings.OKX_BASE_URL} is not reachable ({reachable}); "
                                       "run with --market synthetic for the synthetic market")
                self.stdout.write(f"   OKX at {settings.OKX_BASE_URL} is not reachable ({reachable}): "
                                  f"using the synthetic market (seed {settings.SYNTHETIC_SEED})")
            else:
                try:
                    market = self._okx_market(days=days, step=step)
                except FeedError as exc:
                    if choice == "okx":
                        raise CommandError(f"fetching OKX history failed: {exc}") from exc
                    self.stdout.write(f"   fetching OKX history failed ({exc}): using the synthetic market "
                                      f"(seed {settings.SYNTHETIC_SEED})")
        return market or self._synthetic_market()

    def _synthetic_market(self) -> DemoMarket:
        from market.feeds.synthetic import SyntheticFeed

        feed = SyntheticFeed()
        return DemoMarket(kind="synthetic", feed=feed, start=DEMO_START, end=None,
                          worker_env={"MARKET_DATA_SOURCE": "synthetic"},
                          label=f"the synthetic market (seed {feed.seed})")

    def _okx_market(self, *, days: timedelta, step: timedelta) -> DemoMarket:
        """Fetch the recent history through OkxFeed, write it as a replay directory, walk its last `days`."""
        from market.feeds import okx_feed_from_settings
        from market.feeds.base import FeedError
        from market.feeds.okx import call_with_retries
        from market.feeds.replay import ReplayFeed, replay_dir_write
        from market.models import TIMEFRAME_SECONDS

        self.stdout.write(f"   OKX public data is reachable at {settings.OKX_BASE_URL}: fetching recent {INST} history")
        fetch_began = time.monotonic()
        okx = okx_feed_from_settings()
        try:
            specs = [s for s in call_with_retries(lambda: okx.instruments("SWAP"), what="OKX instruments")
                     if s.inst_id == INST]
            if not specs:
                raise CommandError(f"OKX does not list {INST}")
            candles = {}
            for tf in settings.TIMEFRAMES:
                # The indicator window before the first walked cycle, the walked days, and the bar still forming.
                need = settings.INDICATOR_HISTORY_CANDLES + int(days.total_seconds() // TIMEFRAME_SECONDS[tf]) + 2
                candles[tf] = call_with_retries(lambda tf=tf, need=need: okx.candles(INST, tf, limit=need),
                                                what=f"OKX candles {INST} {tf}")
            try:
                # Settlements every 8 h over the walked days, and a few before them.
                settlements = math.ceil(days.total_seconds() / (8 * 3600)) + 3
                funding = call_with_retries(lambda: okx.funding_rate_history(INST, limit=settlements),
                                            what=f"OKX funding history {INST}")
            except FeedError as exc:
                self.stdout.write(f"   no funding history from OKX ({exc}): funding stays unknown in the replay")
                funding = []
        finally:
            okx.close()  # type: ignore[attr-defined]
        path = replay_dir_write(settings.MARKET_REPLAY_DIR, name=OKX_REPLAY_NAME, instruments=specs,
                                candles={INST: candles}, funding={INST: funding})
        feed = ReplayFeed.from_dir(path)
        first, end = feed.data_range(INST)
        counts = ", ".join(f"{sum(b.confirmed for b in bars)} {tf}" for tf, bars in candles.items())
        known = [f for f in funding if f.rate is not None]
        self.stdout.write(f"   {INST}: {counts} closed candles and {len(known)} funding rates from OKX "
                          f"({first:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC) in {time.monotonic() - fetch_began:.1f}s, "
                          f"written to {path}")
        step_s = int(step.total_seconds())
        start = datetime.fromtimestamp(int((end - days).timestamp()) // step_s * step_s, tz=UTC)
        before_start = feed.series(INST, "4H").closed_end(int(start.timestamp()) * 1000)
        if before_start < settings.INDICATOR_HISTORY_CANDLES:
            self.stdout.write(f"   note: only {before_start} 4H candles before the first cycle "
                              f"(indicators want {settings.INDICATOR_HISTORY_CANDLES})")
        return DemoMarket(kind="okx", feed=feed, start=start, end=end,
                          worker_env={"MARKET_DATA_SOURCE": "replay", "MARKET_REPLAY_DIR": str(path)},
                          label=f"OKX public data ({INST}, the last {days.total_seconds() / 86400:g} days, replayed)")

    def _backfill(self, market: DemoMarket) -> None:
        """Instruments and the candles before the first cycle into the database, as `make run` would hold them."""
        from market.models import Instrument
        from market.services import candles_backfill, instruments_sync

        feed = market.feed
        feed.set_clock(market.start)
        instruments_sync(feed=feed, enable=[INST])
        instrument = Instrument.objects.get(inst_id=INST)
        stored = sum(candles_backfill(feed=feed, instrument=instrument, timeframe=tf, limit=300)
                     for tf in settings.TIMEFRAMES)
        self.stdout.write(f"   {INST}: {stored} candles backfilled (15m/1H/4H up to {market.start:%Y-%m-%d %H:%M})")

    def _start_worker(self, market_env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
        """Two real workers on the embedded broker: the cycle queues, and reflection.

        Reflection (reviews, deep reflection, the validation replays of a new
        playbook) gets its own process so it never holds up a trading cycle,
        as in the full stack where each queue has its own worker.
        """
        from tradebot.controls import broker_dirs_ensure

        broker_dirs_ensure()
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)}
        env.update({**market_env, "BRAIN": env.get("BRAIN", "auto")})
        # The workers are the demo's bot: mode "demo" on every row, the demo's own paper account.
        env.update({"BOT_MODE": "demo", "PAPER_ACCOUNT": DEMO_ACCOUNT})
        # The demo covers a few virtual days: validate a new playbook on the last 3 of them.
        env.setdefault("PLAYBOOK_VALIDATION_DAYS", "3")
        env.setdefault("PLAYBOOK_VALIDATION_CYCLE_SECONDS", "900")
        procs = []
        for name, queues in (("demo", "okx,orders,llm,default"), ("demo-reflection", "reflection")):
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

    def _trade(self, *, start: datetime, end: datetime | None, step: timedelta, budget: float,
               trades: int) -> tuple[str, timedelta]:
        """Cycle on the virtual clock; returns why it stopped (trades, budget, data: its end, or stuck) and how far."""
        from journal.models import Cycle, Mode, ReflectionLog, Trade
        from tradebot.celery import app
        from tradebot.tasks import cycle_start

        started = time.monotonic()
        t = start
        n = 0
        stop = "budget"
        while time.monotonic() - started < budget:
            if end is not None and t + step > end:
                stop = "data"
                break
            t += step
            # Beat's task, with the virtual time: it opens the cycle and sends the chain to the queues.
            cycle_start.apply_async(args=[INST], kwargs={"as_of": t.isoformat(), "trigger": "demo"}, queue="default")
            if not self._wait_cycle(t, timeout=60):
                self.stderr.write(f"   cycle at {t:%Y-%m-%d %H:%M} did not finish in 60 s; see the worker log")
                stop = "stuck"
                break
            app.signature("tradebot.tasks.account_sync").set(queue="orders").apply_async()
            n += 1
            closed = Trade.objects.filter(mode=Mode.DEMO, status="closed").count()
            reviews = ReflectionLog.objects.filter(reflection_type="post_trade").exclude(status__in=("requested", "failed")).count()
            if n % 10 == 0:
                last = Cycle.objects.filter(mode=Mode.DEMO).order_by("-as_of").first()
                self.stdout.write(f"   {t:%Y-%m-%d %H:%M}  cycles {n}  trades closed {closed}  "
                                  f"last: {last.outcome if last else '-'}")
            if closed >= trades and reviews >= 1:
                stop = "trades"
                break
        time.sleep(2)  # the last account sync and reviews
        return stop, t - start

    def _wait_cycle(self, as_of: datetime, *, timeout: float) -> bool:
        from journal.models import TERMINAL_CYCLE_STATES, Cycle, Mode

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cycle = Cycle.objects.filter(mode=Mode.DEMO, as_of=as_of).order_by("-id").first()
            if cycle is not None and cycle.state in TERMINAL_CYCLE_STATES:
                return True
            time.sleep(0.02)
        return False

    # --- summary ----------------------------------------------------------------

    def _summary(self, elapsed: float, *, market: DemoMarket, stop: str, walked: timedelta, trades: int) -> None:
        from journal.models import Cycle, Mode, ReflectionLog, Trade

        cycles = Cycle.objects.filter(mode=Mode.DEMO)
        outcomes = dict(cycles.values_list("outcome").annotate(n=Count("id")))
        sources = sorted({(c.snapshot or {}).get("source", "?") for c in cycles.only("snapshot") if c.snapshot})
        closed = Trade.objects.filter(mode=Mode.DEMO, status="closed")
        pnl = closed.aggregate(v=Sum("pnl_usd"))["v"] or 0
        post_trade = ReflectionLog.objects.filter(reflection_type="post_trade")
        reviews = post_trade.count()
        reviewed = post_trade.exclude(status__in=("requested", "failed")).count()  # as the trading loop counts them
        days = walked.total_seconds() / 86400
        performance = demo_performance_snapshot()
        w = self.stdout.write
        w("")
        w(f"demo finished in {elapsed:.0f}s")
        w(f"market     {market.label}; snapshots from {', '.join(sources) or '-'}; {days:.1f} virtual days walked")
        w(f"cycles     {cycles.count()}  {outcomes}")
        w(f"trades     {Trade.objects.filter(mode=Mode.DEMO).count()} opened, {closed.count()} closed, PnL {pnl:.2f} USDT")
        w(f"reflection {ReflectionLog.objects.count()} entries ({reviews} post-trade)")
        if performance is not None:
            w(f"performance {performance.total_trades} closed trades in the demo's week, win rate "
              f"{performance.win_rate if performance.win_rate is not None else '-'}, equity "
              f"{'-' if performance.equity is None else f'{performance.equity:.2f}'} USDT "
              "(a weekly performance snapshot, mode demo)")
        if closed.count() < trades or reviewed < 1:
            why = {"budget": f"the time budget ran out after {days:.1f} virtual days",
                   "data": f"the data ended after {days:.1f} virtual days",
                   "stuck": "a cycle did not finish (see the worker log)"}.get(stop, stop)
            if closed.count() < trades:
                w(f"note       the bot closed {closed.count()} of the {trades} trades asked for ({why}); "
                  "the rules brain trades only when its setups appear.")
            else:
                exits = dict(closed.values_list("exit_reason").annotate(n=Count("id")))
                w(f"note       no post-trade review ran ({why}); the closed trades' exit reasons: {exits}.")
            if market.kind == "okx":
                w("           `python manage.py demo --market synthetic` replays a stretch of the synthetic market "
                  "known to trade.")
            elif stop == "budget":
                w("           a larger --budget walks further.")
        w("")
        w("Browse the journal: `make web` (or `.venv/bin/python manage.py runserver 127.0.0.1:8000`),")
        w("then open the cockpit on the demo's rows, http://127.0.0.1:8000/dashboard/portfolio/?run=demo,")
        w("or the admin, http://127.0.0.1:8000/admin/ (create a login first: "
          "`.venv/bin/python manage.py createsuperuser`).")


def demo_performance_snapshot() -> Any:
    """A weekly performance snapshot of the demo (mode demo, its paper account's equity) at the end of its
    virtual clock, so the admin's performance page has the demo's figures; None when no demo cycle ran.

    Beat's hourly/daily/weekly snapshots are not part of the demo (it drives the cycles itself), and they would
    count the wall clock's last week, which a demo on a virtual clock never trades in."""
    from execution.exchanges.paper import PaperExchange
    from journal.models import Cycle, Mode
    from tradebot.performance import performance_snapshot_record

    last = Cycle.objects.filter(mode=Mode.DEMO).order_by("-as_of").values_list("as_of", flat=True).first()
    if last is None:
        return None
    return performance_snapshot_record(period="weekly", exchange=PaperExchange(account_name=DEMO_ACCOUNT),
                                       mode=Mode.DEMO, now=last + timedelta(seconds=1))
