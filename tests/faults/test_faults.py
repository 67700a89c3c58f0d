"""The fault suite (#16): the bot on its OWN PostgreSQL and Redis, real workers per queue and beat, faults injected.

One bot run and one pair of servers serve every drill, one after the other (each drill waits for its own starting
point and checks only what follows it): a worker SIGKILLed in COLLECTING, in ANALYZING and in EXECUTING (after the
Order intent row, before the exchange took the order; and after the exchange filled it, before the journal had the
fill), Redis stopped 30 s and PostgreSQL stopped 30 s while a cycle runs, runbot interrupted (SIGINT) during a
cycle after a PostgreSQL restart, then started again. After each: the stuck cycle ends within one interval plus
the stage limit, the instrument runs a cycle to DONE within one interval of the fault's end (plus a cycle's own run
time), and the invariants hold (no duplicate order, every filled opening order has exactly one trade, open trades
match open positions, no cycle left unfinished, every tick a cycle or a recorded gap). `make drill` prints the table
of what each drill measured (FAULT_REPORT).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import missing_service
from tests.faults.bot import (
    ACCOUNT_SYNC,
    INTERVAL,
    ROOT,
    SLACK,
    STAGE_LIMIT,
    TERMINAL,
    Bot,
    held,
    report_row,
    seconds,
    tracebacks,
)
from tests.faults.servers import PrivatePostgres, PrivateRedis, missing_tools
from tradebot.celery import QUEUES

pytestmark = [pytest.mark.faults]

# The outage length; FAULT_OUTAGE_SECONDS shortens it where the suite's time matters more (same paths run).
OUTAGE_SECONDS = int(os.environ.get("FAULT_OUTAGE_SECONDS", "30"))
# Only an outage of two intervals certainly loses a tick: a shorter one may end while beat still retries its send
# (about 5 s) or while the tick's cycle_start still retries within its interval, and then no gap row is due (every
# tick is still a cycle or a gap: the invariants check that either way).
LOSES_A_TICK = OUTAGE_SECONDS >= 2 * INTERVAL
REPORT = Path(os.environ["FAULT_REPORT"]) if os.environ.get("FAULT_REPORT") else None
FREED_WITHIN = INTERVAL + STAGE_LIMIT + 2  # the sweep comes with the first tick past the stage limit (+ beat's jitter)
TRADES_WITHIN = INTERVAL + SLACK  # one interval, plus the cycle's own run time on a loaded machine


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    why = missing_tools()
    if why:
        missing_service(why)
    pg, redis = PrivatePostgres(), PrivateRedis()
    try:
        pg.init()
        redis.start()
        yield pg, redis
    finally:
        redis.destroy()
        pg.destroy()


@pytest.fixture(scope="module")
def bot(servers, tmp_path_factory) -> Iterator[Bot]:  # noqa: ANN001
    pg, redis = servers
    b = Bot(database_url=pg.url, redis_url=redis.url, tmp=tmp_path_factory.mktemp("faults"))
    try:
        b.setup()
        started = b.now()
        b.start_all()
        assert b.wait_done_after(started, timeout=180), b.logs()  # warm: one cycle done
        yield b
    finally:
        b.stop_all()


class Drill:
    """What one drill measured; `finish` checks the outcome, writes the report row and asserts."""

    def __init__(self, bot: Bot, fault: str) -> None:
        self.bot, self.fault = bot, fault
        self.since = bot.now()
        self.logs = bot.log_sizes()
        self.fault_end: datetime | None = None
        self.freed_s: float | None = None
        self.extra: dict[str, Any] = {}
        self.measures: list[Any] = []  # called once the bot trades again: more figures for the report row
        self.ticks_from_beat = True  # the ticks expected: what the suite's beat tried to send (see Bot.invariants)

    def ended(self) -> None:
        self.fault_end = self.bot.now()

    def freed(self, cycle_id: int, *, since: datetime) -> None:
        """The cycle the fault caught reaches a final state (seconds from `since`, the kill or the fault's end)."""
        ended = self.bot.wait_for(f"cycle {cycle_id} to end", "SELECT ended_at FROM journal_cycle WHERE id = %s "
                                  "AND state = ANY(%s)", (cycle_id, list(TERMINAL)), timeout=FREED_WITHIN + 30)
        self.freed_s = round(seconds(since, ended), 1)
        state, reason = self.bot.sql("SELECT state, reason FROM journal_cycle WHERE id = %s", (cycle_id,))[0]
        self.extra["caught_cycle"] = {"id": cycle_id, "state": state, "reason": reason[:200], "ended_s": self.freed_s}
        self.freed_at = ended

    def finish(self) -> dict[str, Any]:
        assert self.fault_end is not None
        start = max(self.fault_end, getattr(self, "freed_at", self.fault_end))
        done = self.bot.wait_done_after(start, timeout=TRADES_WITHIN + 30)
        recovery = None if done is None else round(seconds(self.fault_end, done), 1)
        trades_again = None if done is None else round(seconds(start, done), 1)
        for measure in self.measures:
            self.extra.update(measure(self))
        inv = self.bot.invariants(since=self.since, ticks_from_beat=self.ticks_from_beat)
        text = self.bot.log_since(self.logs)
        row = {"fault": self.fault, "recovery_s": recovery, "trades_again_s": trades_again, "freed_s": self.freed_s,
               "ticks_lost_unrecorded": inv["ticks_unrecorded"], "orders_duplicated": inv["orders_duplicated"],
               "tracebacks": {n: tracebacks(t) for n, t in text.items()}, **self.extra, **inv}
        row["invariants_held"] = bool(held(inv) and trades_again is not None and trades_again <= TRADES_WITHIN
                                      and (self.freed_s is None or self.freed_s <= FREED_WITHIN))
        report_row(REPORT, row)
        # Messages as text, the invariants first: pytest shortens a tuple's repr and would hide which one failed.
        assert done is not None, f"never ran a cycle to DONE again\n{row}\n{self.bot.logs()}"
        assert trades_again <= TRADES_WITHIN, f"traded again after {trades_again} s\n{row}\n{self.bot.logs()}"
        assert self.freed_s is None or self.freed_s <= FREED_WITHIN, f"freed after {self.freed_s} s\n{row}\n{self.bot.logs()}"
        assert held(inv), f"invariants not held: {inv}\n{row}\n{self.bot.logs()}"
        return row


def _kill_at_hold(bot: Bot, *, hold: str, worker: str, fault: str, state: str, end_session: bool,
                  before: Any = None) -> dict[str, Any]:
    drill = Drill(bot, fault)
    with bot.hold(hold) as h:
        if before is not None:
            before()
        pid = h.waiter(timeout=4 * INTERVAL)
        cycle_id = int(bot.sql("SELECT max(id) FROM journal_cycle WHERE state = %s", (state,))[0][0])
        bot.kill(worker)
        killed_at = bot.now()
        h.release(end_session=pid if end_session else None)
    bot.start(worker)
    drill.ended()
    drill.freed(cycle_id, since=killed_at)
    return drill.finish()


def test_a_worker_killed_in_collecting_frees_the_instrument_within_the_stage_limit(bot: Bot) -> None:
    row = _kill_at_hold(bot, hold="collecting", worker="okx", fault="SIGKILL okx worker in COLLECTING",
                        state="COLLECTING", end_session=False)
    assert row["caught_cycle"]["state"] == "INTERRUPTED", row


def test_a_worker_killed_in_analyzing_loses_the_stage_and_the_instrument_trades_again(bot: Bot) -> None:
    row = _kill_at_hold(bot, hold="analyzing", worker="llm", fault="SIGKILL llm worker in ANALYZING",
                        state="ANALYZING", end_session=True)
    assert row["caught_cycle"]["state"] == "INTERRUPTED", row


def test_a_worker_killed_in_executing_before_the_exchange_took_the_order_sends_it_at_most_once(bot: Bot) -> None:
    row = _kill_at_hold(bot, hold="executing_before", worker="orders", state="EXECUTING", end_session=True,
                        fault="SIGKILL orders worker in EXECUTING after the intent row, before the exchange call",
                        before=bot.flatten)
    # The first account sync past the order's in-flight time (the stage limit) settles it; on a loaded machine a sync
    # can expire in the queue (it is every ACCOUNT_SYNC s, expiring after as long), so allow a few of them.
    bot.wait_for("the lost order settled by an account sync", "SELECT 1 FROM execution_order WHERE cycle_id = %s "
                 "AND state <> 'PENDING'", (row["caught_cycle"]["id"],), timeout=STAGE_LIMIT + 6 * ACCOUNT_SYNC)
    cid = bot.sql("SELECT client_order_id, state, error_message FROM execution_order WHERE cycle_id = %s",
                  (row["caught_cycle"]["id"],))
    assert len(cid) == 1, cid  # the intent row was written before the kill
    assert cid[0][1] == "CANCELED" and "never reached the exchange" in cid[0][2], cid
    assert not bot.sql("SELECT 1 FROM execution_paperorder WHERE client_order_id = %s", (cid[0][0],))


def test_a_worker_killed_in_executing_after_the_fill_gets_its_trade_journaled_once(bot: Bot) -> None:
    # No order of an earlier drill may still wait for its settlement: that settlement is an order update the hold
    # below would catch instead of this drill's fill.
    bot.wait_for("earlier orders settled", "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM execution_order "
                 "WHERE state = 'PENDING')", timeout=STAGE_LIMIT + 6 * ACCOUNT_SYNC)
    row = _kill_at_hold(bot, hold="executing_after", worker="orders", state="EXECUTING", end_session=False,
                        fault="SIGKILL orders worker in EXECUTING after the exchange call (filled, no trade yet)",
                        before=bot.flatten)
    orders = bot.sql("SELECT client_order_id, state FROM execution_order WHERE cycle_id = %s",
                     (row["caught_cycle"]["id"],))
    assert len(orders) == 1 and orders[0][1] == "FILLED", orders
    trades = bot.sql("SELECT count(*) FROM journal_trade WHERE client_order_id = %s", (orders[0][0],))[0][0]
    assert trades == 1


def _outage(bot: Bot, *, fault: str, stop: Any, start: Any, measure: Any = None) -> dict[str, Any]:
    drill = Drill(bot, fault)
    if measure is not None:
        drill.measures.append(measure)
    with bot.hold("collecting") as h:  # a cycle is running when the server goes: it is held in COLLECTING
        h.waiter(timeout=3 * INTERVAL)
        running = int(bot.sql("SELECT max(id) FROM journal_cycle WHERE state = 'COLLECTING'")[0][0])
        stop()
        stopped_at = time.monotonic()
    bot.run_for(OUTAGE_SECONDS - (time.monotonic() - stopped_at))
    start()
    drill.ended()
    bot.holds_clear()
    drill.freed(running, since=drill.fault_end)  # type: ignore[arg-type]
    row = drill.finish()
    # One line per failure, never a traceback per tick: beat's sends and every task's database errors.
    assert row["tracebacks"] == {n: 0 for n in row["tracebacks"]}, row
    return row


def _reconnects(drill: Drill) -> dict[str, Any]:
    """Seconds from Redis back to each worker's "Connected to redis" (it took 12 s; after 100 tries it gave up)."""
    text = drill.bot.log_since(drill.logs)
    back: dict[str, float | None] = {}
    for queue in QUEUES:
        stamps = re.findall(r"^(\S+Z) .*Connected to redis", text[queue], re.M)
        back[queue] = round(seconds(drill.fault_end, datetime.fromisoformat(stamps[-1])), 1) if stamps else None
    return {"worker_reconnect_s": back}


def test_redis_stopped_30_s_during_a_cycle_loses_no_tick_unrecorded(bot: Bot, servers) -> None:  # noqa: ANN001
    _, redis = servers
    row = _outage(bot, fault=f"Redis stopped {OUTAGE_SECONDS} s during a cycle", stop=redis.stop, start=redis.start,
                  measure=_reconnects)
    assert row["gap_rows"] >= 1 or not LOSES_A_TICK, row  # the ticks beat could not send are one recorded gap
    reconnect = row["worker_reconnect_s"]
    assert all(s is not None and s <= 5.0 for s in reconnect.values()), reconnect  # retried every 0.5-2 s, forever


def test_postgresql_stopped_30_s_during_a_cycle_loses_no_tick_unrecorded(bot: Bot, servers) -> None:  # noqa: ANN001
    pg, _ = servers
    row = _outage(bot, fault=f"PostgreSQL stopped {OUTAGE_SECONDS} s during a cycle", stop=pg.stop, start=pg.start)
    assert row["gap_rows"] >= 1 or not LOSES_A_TICK, row


def _runbot(bot: Bot, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "manage.py", "runbot", "--no-web", "--concurrency", "1"], cwd=ROOT,
                            env=bot.env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)


def _interrupt(proc: subprocess.Popen[bytes], log: Path, mark: int) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return log.read_bytes()[mark:].decode(errors="replace")


def test_runbot_interrupted_during_a_cycle_after_a_postgresql_restart_records_it_and_starts_again(
        bot: Bot, servers) -> None:  # noqa: ANN001
    pg, _ = servers
    bot.stop_all()  # runbot runs its own workers and beat from here
    log = bot.tmp / "runbot.log"
    proc = _runbot(bot, log)
    again: subprocess.Popen[bytes] | None = None
    try:
        drill = Drill(bot, "runbot SIGINT during a cycle after a PostgreSQL restart, started again")
        drill.ticks_from_beat = False  # runbot's own beat (its log is runbot's), stopped for a while: the span
        # PostgreSQL restarts once runbot runs: its parent and its children each hold a session the restart ends.
        bot.wait_for("runbot's first cycle", "SELECT min(id) FROM journal_cycle WHERE started_at > %s",
                     (drill.since,), timeout=180)
        pg.stop()
        pg.start()
        restarted, mark = bot.now(), log.stat().st_size
        # Its parent reads the database every second (the cycle lines): it must read on after the restart.
        assert bot.wait_done_after(restarted, timeout=120), log.read_text(errors="replace")[-3000:]
        with bot.hold("collecting") as h:  # SIGINT while a cycle runs: it is held inside COLLECTING
            h.waiter(timeout=3 * INTERVAL)
            caught = int(bot.sql("SELECT max(id) FROM journal_cycle WHERE state = 'COLLECTING'")[0][0])
            stop_mark = log.stat().st_size
            proc.send_signal(signal.SIGINT)
            # Until every worker is in its warm shutdown (beat is stopped first): then the held stage finishes,
            # and nothing takes the cycle's next stage.
            deadline = time.monotonic() + 60
            while log.read_bytes()[stop_mark:].count(b"Warm shutdown") < len(QUEUES) and time.monotonic() < deadline:
                time.sleep(0.2)
        out = _interrupt(proc, log, 0)
        said = [line for line in out.splitlines() if line.startswith(("stopped", "stopping", "database unavailable"))]
        assert proc.returncode == 0, said
        assert re.search(r"stopped; [1-9]\d* unfinished cycle\(s\) recorded INTERRUPTED", out), said
        assert "terminating connection due to administrator command" not in out, said
        assert re.search(r"^\d\d:\d\d BTC-USDT-SWAP ", out[mark:], re.M), "no cycle line after the restart: " + \
            out[-3000:]
        state = bot.sql("SELECT state, reason FROM journal_cycle WHERE id = %s", (caught,))[0]
        assert state[0] == "INTERRUPTED" and "runbot stopped" in state[1], state
        mark = log.stat().st_size
        again = _runbot(bot, log)
        drill.ended()
        drill.extra["caught_cycle"] = {"id": caught, "state": state[0], "reason": state[1][:200]}
        done = bot.wait_done_after(drill.fault_end, timeout=180)  # type: ignore[arg-type]
        assert done is not None, log.read_text(errors="replace")[-3000:]
        drill.extra["started_again_s"] = round(seconds(drill.fault_end, done), 1)  # type: ignore[arg-type]
        drill.fault_end = done  # from here: the bot runs again, its next cycles must be on time
        row = drill.finish()
        out2 = _interrupt(again, log, mark)
        assert again.returncode == 0 and "stopped;" in out2, out2[-3000:]
        assert row["invariants_held"], row
    finally:
        for p in (proc, again):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
