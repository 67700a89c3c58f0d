"""`manage.py demo` (`make demo`) as a real process: OKX public data when reachable, else the synthetic market.

Each run gets a scratch SQLite database and embedded broker under tmp_path
and its own session (process group), so its workers are killed whatever
happens. OKX is the fake public-market server serving the real recorded
BTC-USDT-SWAP history as OKX would have at `OKX_NOW`.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_market import CANDLES, FUNDING_RATE_HISTORY, HISTORY_CANDLES, OkxMarketFake
from tests.tradebot.test_runbot import bot_env, free_port, group_alive

ROOT = Path(__file__).resolve().parents[2]
# Measured through this demo on the recorded data: from 2025-11-24 the first trade closes within the first
# hours and is reviewed, so `--trades 1` ends the run after a few dozen cycles.
OKX_NOW = datetime(2025, 12, 1, 0, 0, tzinfo=UTC)


LIVE_ROWS = """
from django.utils import timezone
from execution.models import BotState, PaperAccount
from journal.models import Cycle, Mode
from market.models import Instrument
PaperAccount.objects.create(name="default", cash="1234.5")
BotState.objects.create(scope="live")
inst = Instrument.objects.create(inst_id="ETH-USDT-SWAP", ct_val=1, lot_sz=1, min_sz=1, tick_sz=1)
Cycle.objects.create(instrument=inst, mode=Mode.LIVE, as_of=timezone.now(), state="DONE", outcome="hold")
"""


def run_demo(var_dir: Path, okx_url: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = bot_env(var_dir, okx_url, LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "manage.py", "demo", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if group_alive(proc.pid):  # a worker left behind (or the demo itself on a timeout)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def demo_cycles(var_dir: Path) -> list[tuple[datetime, dict]]:
    with sqlite3.connect(var_dir / "tradebot.sqlite3") as db:
        rows = db.execute("select as_of, snapshot from journal_cycle where mode = 'demo' order by as_of").fetchall()
    return [(datetime.fromisoformat(a).replace(tzinfo=UTC), json.loads(s) if s else {}) for a, s in rows]


def closes_15m(shared_data: Path) -> dict[datetime, Decimal]:
    with gzip.open(shared_data / "okx_BTC-USDT-SWAP_15m.csv.gz", "rt", newline="") as fh:
        return {datetime.fromtimestamp(int(r["ts"]) / 1000, tz=UTC): Decimal(r["close"]) for r in csv.DictReader(fh)
                if int(r["ts"]) >= int((OKX_NOW - timedelta(days=10)).timestamp() * 1000)}


@pytest.fixture
def okx(shared_data: Path) -> Iterator[OkxMarketFake]:
    with FakeHttpServer() as server:
        fake = OkxMarketFake(server)
        fake.real_market(shared_data, until=OKX_NOW)
        yield fake


def test_with_okx_reachable_the_demo_trades_recent_okx_history_through_the_workers(
        okx: OkxMarketFake, shared_data: Path, tmp_path: Path) -> None:
    result = run_demo(tmp_path, okx.url, "--trades", "1", "--budget", "120")
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    assert f"OKX public data is reachable at {okx.url}" in out
    assert "4/4 trading OKX public data (BTC-USDT-SWAP, the last 7 days, replayed)" in out
    assert "from 2025-11-24 00:00 to 2025-12-01 00:00" in out
    # History enough for the 4H indicator window before the first walked cycle, paged as OKX pages it.
    assert "1674 15m, 1170 1H, 1044 4H closed candles" in out and "note: only" not in out
    assert okx.calls(HISTORY_CANDLES) and {c.query["bar"] for c in okx.calls(CANDLES)} == {"15m", "1H", "4H"}
    assert okx.calls(FUNDING_RATE_HISTORY)

    cycles = demo_cycles(tmp_path)
    assert cycles and {s.get("source") for _, s in cycles if s} == {"okx-replay"}
    # The cycles saw the recorded OKX prices: the close of the last 15m bar closed by each cycle.
    closes = closes_15m(shared_data)
    for as_of, snapshot in cycles[:20]:
        if snapshot:
            assert Decimal(str(snapshot["price"])) == closes[as_of - timedelta(minutes=15)], as_of
    assert "snapshots from okx-replay" in out
    # Trades opened and closed on that data, and the closed one was reviewed.
    with sqlite3.connect(tmp_path / "tradebot.sqlite3") as db:
        closed = db.execute("select count(*) from journal_trade where mode = 'demo' and status = 'closed'").fetchone()[0]
        # Finished reviews only: a `requested` row says a review was queued, not that it ran.
        reviews = db.execute("select count(*) from journal_reflectionlog where reflection_type = 'post_trade' "
                             "and status = 'done'").fetchone()[0]
    assert closed >= 1 and reviews >= 1, out[-3000:]
    assert "note " not in out


def test_with_okx_unreachable_the_demo_says_so_and_trades_the_synthetic_market(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    # What `make run` left in the same database: the live bot's paper account, bot state and a cycle.
    env = bot_env(tmp_path, url, LOG_LEVEL="WARNING")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=120)
    subprocess.run([sys.executable, "manage.py", "shell", "-c", LIVE_ROWS], cwd=ROOT, env=env, check=True, timeout=120)
    result = run_demo(tmp_path, url, "--budget", "3")
    out = result.stdout
    assert result.returncode == 0, out[-4000:]
    assert f"OKX at {url} is not reachable" in out and "using the synthetic market (seed 7)" in out
    assert "4/4 trading the synthetic market (seed 7) on a virtual clock from 2025-09-01 00:00" in out
    cycles = demo_cycles(tmp_path)
    assert cycles and {s.get("source") for _, s in cycles if s} == {"synthetic"}
    assert not (tmp_path / "market-replay").exists()
    # The demo is told apart: its rows are mode "demo" on its own paper account; the live bot's are untouched.
    with sqlite3.connect(tmp_path / "tradebot.sqlite3") as db:
        modes = dict(db.execute("select mode, count(*) from journal_cycle group by mode").fetchall())
        accounts = dict(db.execute("select name, cash from execution_paperaccount").fetchall())
        scopes = {row[0] for row in db.execute("select scope from execution_botstate")}
    assert modes["live"] == 1 and modes["demo"] == len(cycles) > 0
    assert Decimal(str(accounts["default"])) == Decimal("1234.5") and "demo" in accounts
    assert {"live", "demo"} <= scopes
    # Three seconds are too short for two closed trades: the summary says so instead of pretending.
    assert "note       the bot closed 0 of the 2 trades asked for (the time budget ran out" in out


def test_market_okx_refuses_to_fall_back_when_okx_is_unreachable(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_demo(tmp_path, url, "--market", "okx", timeout=120)
    assert result.returncode != 0
    assert f"OKX at {url} is not reachable" in result.stdout and "--market synthetic" in result.stdout
    assert "3/4 starting Celery workers" not in result.stdout
