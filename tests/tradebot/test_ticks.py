"""Every beat tick is accounted for: late, out-of-order and missed ticks are SKIPPED cycles with the reason (#16)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from journal.models import Cycle, CycleOutcome, CycleState
from market.models import Instrument
from tradebot.cycle import cycle_open

S = CycleState
EVERY = 300


@pytest.fixture
def btc(db) -> Instrument:
    return Instrument.objects.create(
        inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


def tick(btc: Instrument, sent: datetime, now: datetime | None = None) -> Cycle:
    cycle = cycle_open(instrument=btc, as_of=sent, sent_at=sent, tick_every=EVERY, now=now or sent)
    if cycle.state == S.IDLE:  # as if it ran: the next tick is not blocked
        Cycle.objects.filter(pk=cycle.pk).update(state=S.DONE, outcome=CycleOutcome.NO_SIGNAL)
    return cycle


def test_a_tick_sent_more_than_one_interval_ago_is_recorded_skipped_as_late(btc: Instrument) -> None:
    t0 = timezone.now() - timedelta(hours=1)
    tick(btc, t0)
    late = tick(btc, t0 + timedelta(seconds=EVERY), now=t0 + timedelta(seconds=EVERY * 2 + 1))
    assert late.state == S.SKIPPED and late.reason.startswith("late: the tick was sent 301s ago")


def test_a_tick_for_a_time_before_the_newest_cycle_is_recorded_skipped_as_out_of_order(btc: Instrument) -> None:
    newer = cycle_open(instrument=btc, as_of=datetime(2025, 1, 1, 6, 15, tzinfo=UTC))
    Cycle.objects.filter(pk=newer.pk).update(state=S.DONE)
    old = cycle_open(instrument=btc, as_of=datetime(2025, 1, 1, 6, 0, tzinfo=UTC))
    assert old.state == S.SKIPPED and f"out of order: a tick for 2025-01-01T06:00:00+00:00 after cycle {newer.pk}" in old.reason


def test_ticks_that_never_arrived_are_one_gap_row_with_their_count_before_the_next_cycle(btc: Instrument) -> None:
    t0 = timezone.now() - timedelta(hours=2)
    first = tick(btc, t0)
    after_outage = tick(btc, t0 + timedelta(seconds=4 * EVERY + 3))  # three ticks lost (e.g. Redis down)
    assert after_outage.state == S.IDLE
    gap = Cycle.objects.exclude(pk__in=[first.pk, after_outage.pk]).get()
    assert gap.state == S.SKIPPED and gap.stage_times == {"trigger": "gap", "missed_ticks": 3}
    assert gap.as_of == t0 + timedelta(seconds=EVERY) and "3 tick(s)" in gap.reason and "never ran" in gap.reason
    # The next on-time tick records no gap.
    tick(btc, t0 + timedelta(seconds=5 * EVERY))
    assert Cycle.objects.filter(stage_times__trigger="gap").count() == 1


def test_a_stage_past_its_own_time_limit_is_interrupted_not_after_seven_limits(btc: Instrument, settings) -> None:
    settings.CELERY_TASK_TIME_LIMIT = 60
    settings.CYCLE_STAGE_GRACE_SECONDS = 5
    now = timezone.now()
    stuck = cycle_open(instrument=btc, as_of=now - timedelta(seconds=300), now=now - timedelta(seconds=300))
    started = (now - timedelta(seconds=66)).isoformat()
    Cycle.objects.filter(pk=stuck.pk).update(state=S.COLLECTING, stage_times={"COLLECTING": {"started": started}})
    nxt = cycle_open(instrument=btc, as_of=now, now=now)
    stuck.refresh_from_db()
    assert nxt.state == S.IDLE and stuck.state == S.INTERRUPTED
    assert stuck.reason == "stale: still COLLECTING 66s after the stage started (its limit 65s)"


def test_a_stage_resumed_recently_still_blocks_the_instrument(btc: Instrument, settings) -> None:
    settings.CELERY_TASK_TIME_LIMIT = 60
    now = timezone.now()
    stuck = cycle_open(instrument=btc, as_of=now - timedelta(seconds=300), now=now - timedelta(seconds=300))
    Cycle.objects.filter(pk=stuck.pk).update(state=S.EXECUTING, stage_times={"EXECUTING": {
        "started": (now - timedelta(seconds=200)).isoformat(), "resumed": (now - timedelta(seconds=5)).isoformat()}})
    nxt = cycle_open(instrument=btc, as_of=now, now=now)
    assert nxt.state == S.SKIPPED and f"previous cycle {stuck.pk} still EXECUTING" in nxt.reason


def test_a_tick_the_database_refused_is_retried_within_its_interval_then_left_to_the_next_tick_as_a_gap(
        btc: Instrument, settings, monkeypatch) -> None:
    from celery.exceptions import Retry
    from django.db import OperationalError

    from tradebot import tasks
    from tradebot.celery import SENT_AT_HEADER

    settings.DECISION_CYCLE_SECONDS = EVERY

    def db_down(*_, **__):  # noqa: ANN002, ANN003, ANN202 - what psycopg raises with PostgreSQL stopped
        raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")

    monkeypatch.setattr(tasks, "Instrument", type("Down", (), {"objects": type("M", (), {"filter": db_down})()}))
    fresh = {SENT_AT_HEADER: timezone.now().isoformat()}
    with pytest.raises(Retry):  # the broker gets it back with a countdown of 1-5 s: the tick is not dropped
        tasks.cycle_start.apply(args=["BTC-USDT-SWAP"], headers=fresh, throw=True)
    stale = {SENT_AT_HEADER: (timezone.now() - timedelta(seconds=EVERY)).isoformat()}
    assert tasks.cycle_start.apply(args=["BTC-USDT-SWAP"], headers=stale, throw=True).get() is None  # out of time
    monkeypatch.undo()
    sent = timezone.now().replace(microsecond=0)
    tick(btc, sent - timedelta(seconds=3 * EVERY))
    tick(btc, sent)  # the next tick that runs records the one given up as a gap
    gap = Cycle.objects.get(stage_times__trigger="gap")
    assert gap.stage_times["missed_ticks"] == 2 and "never ran" in gap.reason


def test_an_outage_logs_one_line_per_failure_never_a_traceback(caplog) -> None:
    import logging

    from django.db import OperationalError

    from tradebot.celery import OutageOneLine  # noqa: F401 - installed on these loggers at import

    def log_failure(name: str, exc: BaseException) -> logging.LogRecord:
        logger = logging.getLogger(name)
        try:
            raise exc
        except BaseException:
            logger.error("Task %s raised unexpected: %r", "tradebot.tasks.cycle_collect[1]", exc, exc_info=True)
        return caplog.records[-1]

    with caplog.at_level(logging.ERROR):
        record = log_failure("celery.app.trace", OperationalError("server closed the connection unexpectedly\nmore"))
        assert record.exc_info is None and "[OperationalError: server closed the connection unexpectedly]" in \
            record.getMessage()
        other = log_failure("celery.app.trace", ValueError("a bug"))
        assert other.exc_info is not None  # anything else keeps its traceback
        beat = log_failure("celery.beat", ConnectionRefusedError(111, "Connection refused"))
        assert beat.exc_info is None and "beat could not send a task" in beat.getMessage()


def test_stage_tasks_go_back_to_the_broker_when_their_worker_dies_and_reconnects_never_give_up() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tradebot.celery import app
    from tradebot.pipeline import STAGE_TASK_NAMES

    for name in STAGE_TASK_NAMES.values():
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost, name  # a SIGKILLed worker's stage is handed out again
    assert app.conf.broker_connection_max_retries is None and app.conf.broker_connection_retry
    code = "import django; django.setup(); from django.conf import settings; " \
           "print(settings.CELERY_BROKER_TRANSPORT_OPTIONS['visibility_timeout'])"
    env = {"DJANGO_SETTINGS_MODULE": "tradebot.settings", "PATH": "/usr/bin:/bin",
           "TRADEBOT_VAR_DIR": str(ROOT / "var"), "REDIS_URL": "redis://127.0.0.1:1/0", "CELERY_TASK_SOFT_TIME_LIMIT": "40", "CELERY_TASK_TIME_LIMIT": "60"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "70", done.stderr[-2000:]  # the hard limit plus 10 s, not 3,600


def test_beat_keeps_its_entries_and_ticking_through_a_database_outage(btc: Instrument, monkeypatch) -> None:
    from django.db import OperationalError

    from tradebot.beat import OutageProofScheduler, beat_sync
    from tradebot.celery import app

    beat_sync()
    scheduler = OutageProofScheduler(app=app, lazy=True)
    entries = set(scheduler.schedule)
    assert "cycle BTC-USDT-SWAP" in entries

    def db_down() -> None:
        raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")

    # The five-minute full read (or a changed entry) while PostgreSQL is down: it killed beat.
    monkeypatch.setattr(scheduler, "schedule_changed", lambda: True)
    monkeypatch.setattr(scheduler, "all_as_schedule", db_down)
    assert set(scheduler.schedule) == entries
    monkeypatch.undo()
    # Beat started while the database is down: it waits for it (one line a try) instead of dying on its first read.
    import tradebot.beat

    starting = OutageProofScheduler(app=app, lazy=True)
    real_read, waits = starting.all_as_schedule, []
    reads = iter([db_down, db_down, real_read])
    monkeypatch.setattr(starting, "all_as_schedule", lambda: next(reads)())
    monkeypatch.setattr(tradebot.beat.time, "sleep", waits.append)
    assert set(starting.schedule) == entries and waits == [2, 2]


def test_the_ticks_missed_while_runbot_was_stopped_are_recorded_by_its_first_cycle_at_start(
        btc: Instrument, settings) -> None:
    from tradebot import tasks
    from tradebot.celery import SENT_AT_HEADER
    from tradebot.controls import broker_dirs_ensure

    settings.DECISION_CYCLE_SECONDS = EVERY
    broker_dirs_ensure()  # the embedded broker takes the first cycle's chain
    now = timezone.now().replace(microsecond=0)
    tick(btc, now - timedelta(seconds=4 * EVERY + 17))  # the last tick before runbot stopped; three missed since
    # Sent when runbot started, run when its workers were up: the first cycle is for the moment it runs, so the
    # workers' start (two intervals here) is inside the gap it records, not a hole between the gap and it.
    started = {SENT_AT_HEADER: (now - timedelta(seconds=2 * EVERY)).isoformat()}
    first_id = tasks.cycle_start.apply(args=["BTC-USDT-SWAP"], kwargs={"trigger": "start"}, headers=started,
                                       throw=True).get()
    gap = Cycle.objects.get(stage_times__trigger="gap")
    assert gap.stage_times["missed_ticks"] == 3 and "or the bot was stopped" in gap.reason
    assert Cycle.objects.get(pk=first_id).stage_times["trigger"] == "start"
