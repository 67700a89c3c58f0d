"""The bot as an operator runs it, for the fault suite: workers per queue and beat as real processes.

Synthetic market, rules brain, paper exchange, 10 s cycles on beat's real-time clock, 5 s account syncs,
stage limits of 5 s (soft) and 8 s (hard), so a lost stage is swept after 18 s and Redis hands an
unacknowledged task out again after 18 s (the hard limit plus 10 s). A process that dies is started again,
as runbot and docker-compose do.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from tradebot.celery import QUEUES

ROOT = Path(__file__).resolve().parents[2]
INST = "BTC-USDT-SWAP"
INTERVAL = 10
HARD_LIMIT = 8
STAGE_LIMIT = HARD_LIMIT + 10  # tradebot.cycle.stage_limit_seconds with the default grace
TERMINAL = ("DONE", "SKIPPED", "FAILED", "INTERRUPTED")

SETUP = """
import django; django.setup()
from market.feeds import synthetic_feed_from_settings
from market.services import instruments_sync
from tradebot.beat import beat_sync
instruments_sync(feed=synthetic_feed_from_settings(), enable=[%r])
beat_sync()
""" % INST


class Bot:
    def __init__(self, *, database_url: str, redis_url: str, tmp: Path) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OKX_", "ANTHROPIC", "PERPLEXITY", "MARKET_", "CELERY_"))
                    and k not in ("DATABASE_URL", "REDIS_URL", "BRAIN", "TRADEBOT_VAR_DIR")}
        self.env.update({
            "DATABASE_URL": database_url, "REDIS_URL": redis_url, "TRADEBOT_VAR_DIR": str(tmp / "var"),
            "MARKET_DATA_SOURCE": "synthetic", "BRAIN": "rules", "DJANGO_SETTINGS_MODULE": "tradebot.settings",
            "DECISION_CYCLE_SECONDS": str(INTERVAL), "ACCOUNT_SYNC_SECONDS": "5",
            "CELERY_TASK_SOFT_TIME_LIMIT": "5", "CELERY_TASK_TIME_LIMIT": str(HARD_LIMIT),
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO",
        })
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}
        self._db: psycopg.Connection | None = None

    # --- processes ---------------------------------------------------------------------------------------------

    def setup(self) -> None:
        for cmd in ([sys.executable, "manage.py", "migrate", "--noinput"], [sys.executable, "-c", SETUP]):
            done = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, timeout=300)
            if done.returncode:
                raise RuntimeError(done.stderr.decode(errors="replace")[-3000:])

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}.log"

    def _command(self, name: str) -> list[str]:
        celery = [sys.executable, "-m", "celery", "-A", "tradebot"]
        if name == "beat":
            return celery + ["beat", "-l", "INFO", "-s", str(self.tmp / "beat-schedule")]
        return celery + ["worker", "-Q", name, "-n", f"{name}@faults", "-P", "solo", "--without-gossip",
                         "--without-mingle", "--without-heartbeat", "-l", "INFO"]

    def start(self, name: str, *, wait: bool = True) -> int:
        path = self.log_path(name)
        mark = path.stat().st_size if path.exists() else 0
        self.procs[name] = subprocess.Popen(self._command(name), cwd=ROOT, env=self.env,
                                            stdout=open(path, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        if wait:
            self.wait_ready(name, mark)
        return mark

    def wait_ready(self, name: str, mark: int, timeout: float = 120.0) -> None:
        path = self.log_path(name)
        ready = b"beat: Starting" if name == "beat" else b"ready."
        deadline = time.monotonic() + timeout
        while ready not in path.read_bytes()[mark:]:
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def start_all(self) -> None:
        marks = {name: self.start(name, wait=False) for name in (*QUEUES, "beat")}
        for name, mark in marks.items():
            self.wait_ready(name, mark)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def supervise(self) -> None:
        """Start again any process that died (what runbot's parent and compose's restart policy do)."""
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.start(name, wait=False)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGQUIT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()
        if self._db is not None:
            self._db.close()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + self.log_path(n).read_text(errors="replace")[-3000:]
                         for n in (*QUEUES, "beat") if self.log_path(n).exists())

    # --- the database, read by the test itself ---------------------------------------------------------------------

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        for _ in range(2):
            try:
                if self._db is None or self._db.closed or self._db.broken:
                    self._db = psycopg.connect(self.database_url.replace("postgres://", "postgresql://"),
                                               autocommit=True, connect_timeout=5)
                with self._db.cursor() as cur:
                    cur.execute(query, params)
                    return list(cur.fetchall()) if cur.description else []
            except psycopg.OperationalError:
                self._db = None
        raise RuntimeError("the private PostgreSQL does not answer")

    def now(self) -> datetime:
        return self.sql("SELECT now()")[0][0]

    def wait_done_after(self, since: datetime, *, timeout: float) -> datetime | None:
        """When the first cycle that started after `since` finished DONE (the instrument trades again), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.supervise()
            rows = self.sql("SELECT min(ended_at) FROM journal_cycle WHERE mode = 'live' AND state = 'DONE' "
                            "AND started_at > %s", (since,))
            if rows and rows[0][0] is not None:
                return rows[0][0]
            time.sleep(0.2)
        return None

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.supervise()
            time.sleep(0.2)

    # --- the invariants ----------------------------------------------------------------------------------------------

    def invariants(self, *, since: datetime) -> dict[str, Any]:
        """The issue's invariants over the cycles since `since` (orders and trades: all of them)."""
        duplicated = self.sql("SELECT count(*) - count(DISTINCT client_order_id) FROM execution_order")[0][0]
        filled_without_one_trade = self.sql(
            "SELECT count(*) FROM execution_order o WHERE o.state = 'FILLED' AND o.action IN ('OPEN_LONG', 'OPEN_SHORT') "
            "AND (SELECT count(*) FROM journal_trade t WHERE t.client_order_id = o.client_order_id) <> 1")[0][0]
        open_trades = self.sql("SELECT count(*) FROM journal_trade WHERE status = 'open' AND mode = 'live'")[0][0]
        open_positions = self.sql("SELECT count(*) FROM execution_paperposition WHERE status = 'open'")[0][0]
        stuck = self.sql(
            "SELECT id, state FROM journal_cycle WHERE state NOT IN %s AND started_at < now() - make_interval(secs => %s)"
            .replace("%s AND", "(%s, %s, %s, %s) AND", 1), (*TERMINAL, INTERVAL + STAGE_LIMIT))
        rows = self.sql("SELECT as_of, stage_times FROM journal_cycle WHERE mode = 'live' AND as_of >= %s "
                        "ORDER BY as_of", (since,))
        recorded = sum(int((t or {}).get("missed_ticks", 1)) for _, t in rows)
        expected = round((rows[-1][0] - rows[0][0]).total_seconds() / INTERVAL) + 1 if rows else 0
        gaps = sum(1 for _, t in rows if (t or {}).get("trigger") == "gap")
        return {
            "orders_duplicated": int(duplicated), "filled_orders_without_one_trade": int(filled_without_one_trade),
            "open_trades": int(open_trades), "open_positions": int(open_positions),
            "stuck_cycles": [list(r) for r in stuck], "ticks_expected": expected, "ticks_recorded": recorded,
            "ticks_unrecorded": max(0, expected - recorded), "gap_rows": gaps,
        }


def held(inv: dict[str, Any]) -> bool:
    return (inv["orders_duplicated"] == 0 and inv["filled_orders_without_one_trade"] == 0
            and inv["open_trades"] == inv["open_positions"] and not inv["stuck_cycles"]
            and inv["ticks_unrecorded"] == 0)


def report_row(path: Path | None, row: dict[str, Any]) -> None:
    if path is None:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
