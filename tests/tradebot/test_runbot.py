"""`manage.py runbot` (`make run`) as a real process: it waits for OKX, then starts, then stops cleanly.

The bot runs in its own session (process group) on a scratch SQLite database
and embedded broker under tmp_path; OKX is the fake public-market server,
started on the port runbot already asks, serving the real recorded samples.
Whatever happens, every process of the group is killed at the end.
"""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from django.conf import settings

from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_market import CANDLES, OkxMarketFake
from tradebot.celery import QUEUES
from tradebot.management.commands.runbot import worker_commands

ROOT = Path(__file__).resolve().parents[2]
# The fake OKX answers as OKX did at this moment (the recorded samples cover it).
OKX_NOW = datetime(2026, 1, 15, 20, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bot_env(var_dir: Path, okx_url: str, **extra: str) -> dict[str, str]:
    """The embedded defaults on a scratch var dir: no keys, no Redis, no PostgreSQL."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OKX_", "ANTHROPIC", "PERPLEXITY", "MARKET_", "CELERY_"))
           and k not in ("DATABASE_URL", "REDIS_URL", "BRAIN", "DJANGO_SETTINGS_MODULE", "TRADEBOT_VAR_DIR")}
    env.update({"TRADEBOT_VAR_DIR": str(var_dir), "OKX_BASE_URL": okx_url, "MARKET_DATA_SOURCE": "auto",
                "BRAIN": "rules", "DJANGO_SETTINGS_MODULE": "tradebot.settings", "PYTHONUNBUFFERED": "1",
                "MARKET_PROBE_TIMEOUT_SECONDS": "2", "LOG_LEVEL": "INFO", **extra})
    return env


def group_alive(pgid: int) -> list[int]:
    """Processes of the process group that are still running (zombies are already gone)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


class Bot:
    """runbot in its own session, its output (stdout and stderr) in one file."""

    def __init__(self, var_dir: Path, env: dict[str, str], *args: str) -> None:
        self.log_path = var_dir / "runbot.out"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen([sys.executable, "manage.py", "runbot", "--no-web", *args], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, check: Callable[[str], bool], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output
            if check(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"runbot exited ({self.proc.returncode}) before {what}:\n{text[-4000:]}")
            time.sleep(0.1)
        raise AssertionError(f"runbot: no {what} within {timeout:.0f} s:\n{self.output[-4000:]}")

    def kill_all(self) -> None:
        for _ in range(2):
            if not group_alive(self.proc.pid):
                break
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A migrated scratch database and broker directory for the bot."""
    env = bot_env(tmp_path, "http://127.0.0.1:9")
    done = subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tmp_path


@pytest.fixture
def bots() -> Iterator[list[Bot]]:
    started: list[Bot] = []
    yield started
    for bot in started:
        bot.kill_all()


def test_runbot_waits_for_unreachable_okx_then_starts_on_okx_data_and_stops_cleanly_on_ctrl_c(
        scratch: Path, shared_data: Path, bots: list[Bot]) -> None:
    port = free_port()
    bot = Bot(scratch, bot_env(scratch, f"http://127.0.0.1:{port}"), "--retry-seconds", "0.5", "--concurrency", "1")
    bots.append(bot)

    # Nothing listens on the port: it says so, twice (so it retries), and starts nothing meanwhile.
    waiting = bot.wait_for("second 'unreachable' message", lambda t: t.count("is unreachable") >= 2, timeout=60)
    assert f"OKX at http://127.0.0.1:{port} is unreachable" in waiting and "retrying in 0.5s" in waiting
    assert "retrying in 1s" in waiting  # the delay doubles
    for started in ("instruments:", "beat:", "market data:", "broker:"):
        assert started not in waiting
    assert descendants(bot.proc.pid) == set()

    server = FakeHttpServer(port=port)  # bound now; runbot's next probe waits in the backlog until it serves
    okx = OkxMarketFake(server)
    okx.real_market(shared_data, until=OKX_NOW)
    with server:
        text = bot.wait_for("worker ready", lambda t: "ready." in t and "beat:" in t, timeout=90)
        assert f"market data: OKX public data at http://127.0.0.1:{port}" in text
        assert "market data: okx" in text and "synthetic market (MARKET_DATA_SOURCE" not in text
        assert "instruments: 3 synced, trading BTC-USDT-SWAP" in text

        with sqlite3.connect(scratch / "tradebot.sqlite3") as db:
            # The instruments are OKX's (the inverse BTC-USD-SWAP is no synthetic instrument).
            rows = dict(db.execute("select inst_id, trading_enabled from market_instrument").fetchall())
            assert rows == {"BTC-USD-SWAP": 0, "ETH-USDT-SWAP": 0, "BTC-USDT-SWAP": 1}
            entries = {name for (name,) in db.execute("select name from django_celery_beat_periodictask")}
            assert {"cycle BTC-USDT-SWAP", "account sync"} <= entries
        # The worker builds its first snapshot from OKX, not from the synthetic market.
        deadline = time.monotonic() + 30
        while not okx.calls(CANDLES) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert okx.calls(CANDLES), "the worker never asked OKX for candles"
        children = descendants(bot.proc.pid)
        assert len(children) >= 3  # the worker, its pool process and beat
        # One worker per queue, each a child of runbot (issue 20: the orders queue has its own).
        workers = {}
        for pid in children:
            try:
                argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if "worker" in argv and "-Q" in argv:
                workers.setdefault(argv[argv.index("-Q") + 1], argv)
        assert set(workers) == set(QUEUES), workers
        assert workers["orders"][workers["orders"].index("-c") + 1] == str(settings.ORDERS_WORKER_CONCURRENCY)

        bot.proc.send_signal(signal.SIGINT)
        assert bot.proc.wait(timeout=90) == 0, bot.output[-4000:]
    out = bot.output
    assert "stopping: beat first" in out and "stopped; 0 unfinished cycle(s) recorded INTERRUPTED" in out
    assert "Traceback" not in out, out[-4000:]
    # Every child (they all share runbot's process group) has exited.
    assert group_alive(bot.proc.pid) == []


def test_ctrl_c_while_waiting_for_okx_stops_at_once_and_starts_nothing(scratch: Path, bots: list[Bot]) -> None:
    bot = Bot(scratch, bot_env(scratch, f"http://127.0.0.1:{free_port()}"), "--retry-seconds", "30")
    bots.append(bot)
    bot.wait_for("'unreachable' message", lambda t: "is unreachable" in t, timeout=60)
    bot.proc.send_signal(signal.SIGINT)
    assert bot.proc.wait(timeout=15) == 0, bot.output[-4000:]
    out = bot.output
    assert "stopped while waiting for OKX; nothing was started" in out
    assert "Traceback" not in out and "beat:" not in out
    assert group_alive(bot.proc.pid) == []


def test_each_queue_gets_its_own_worker_the_orders_one_with_its_own_processes(settings) -> None:  # noqa: ANN001
    settings.LLM_WORKER_THREADS, settings.ORDERS_WORKER_CONCURRENCY = 6, 3
    commands = worker_commands(["celery"], concurrency=1)
    assert set(commands) == {f"worker-{q}" for q in QUEUES} and "worker-orders" in commands
    pools = {name: cmd[cmd.index("-Q") + 1:cmd.index("-l")] for name, cmd in commands.items()}
    assert pools["worker-orders"] == ["orders", "-c", "3"]
    assert pools["worker-okx"] == ["okx", "-c", "1"] and pools["worker-default"] == ["default", "-c", "1"]
    assert pools["worker-llm"] == ["llm", "-P", "threads", "-c", "6"]
    assert worker_commands(["celery"], concurrency=2, orders_concurrency=4)["worker-orders"][2:6] == [
        "-Q", "orders", "-c", "4"]
    assert all(cmd[cmd.index("-n") + 1] == f"runbot-{name.removeprefix('worker-')}@%h" for name, cmd in commands.items())
