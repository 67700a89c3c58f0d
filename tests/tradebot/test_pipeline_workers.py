"""The cycle through REAL Celery workers (one per queue) on Redis and PostgreSQL.

Rules brain, paper exchange, synthetic market (seeded, so the times below are
known to give: a screener "no signal" at 00:05, an OPEN_LONG at 00:30 and
00:40 on 2025-09-05, and the rules brain's exit (CLOSE) of the 00:30 long at
05:00, as a replay of that day finds).
"""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connection, transaction

from journal.models import (
    Cycle,
    CycleOutcome,
    CycleState,
    ReflectionLog,
    ReflectionType,
    RiskRejection,
    Trade,
)
from market.models import Instrument
from tests.tradebot.workers import Workers, workers_made
from tradebot.cycle import cycle_open
from tradebot.pipeline import cycle_launch, pipeline_chain, stage_signature
from tradebot.stages import STAGES

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

INST = "BTC-USDT-SWAP"
DAY = datetime(2025, 9, 5, tzinfo=UTC)
NO_SIGNAL_AT = DAY + timedelta(minutes=5)
OPEN_AT = DAY + timedelta(minutes=30)
OPEN_AT_2 = DAY + timedelta(minutes=40)
CLOSE_AT = DAY + timedelta(hours=5)
S = CycleState


@pytest.fixture(scope="module")
def workers(django_db_setup, django_db_blocker, tmp_path_factory):  # noqa: ANN001, ANN201
    w = workers_made(django_db_blocker, tmp_path_factory, "workers")
    w.start_all()
    yield w
    w.stop_all()


@pytest.fixture(autouse=True)
def idle_workers_after(workers: Workers):  # noqa: ANN201
    """Each test ends when the workers have finished what it started, before the flush."""
    yield
    workers.wait_idle()


@pytest.fixture
def btc(workers: Workers) -> Instrument:
    from market.feeds import synthetic_feed_from_settings
    from market.services import instruments_sync

    instruments_sync(feed=synthetic_feed_from_settings(), enable=[INST])
    return Instrument.objects.get(inst_id=INST)


def wait_done(cycle_id: int, workers: Workers, timeout: float = 40.0) -> Cycle:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cycle = Cycle.objects.get(pk=cycle_id)
        if cycle.state in (S.DONE, S.FAILED, S.SKIPPED, S.INTERRUPTED):
            return cycle
        time.sleep(0.05)
    raise AssertionError(f"cycle {cycle_id} still {Cycle.objects.get(pk=cycle_id).state}\n{workers.worker_logs()}")


def wait_state(cycle_id: int, state: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Cycle.objects.filter(pk=cycle_id, state=state).exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"cycle {cycle_id} never reached {state}: {Cycle.objects.get(pk=cycle_id).state}")


def orders_and_trades() -> tuple[int, int]:
    from execution.models import Order

    return Order.objects.count(), Trade.objects.count()


def test_a_beat_tick_runs_the_cycle_to_a_journaled_trade_with_each_stage_on_its_queue(workers: Workers, btc: Instrument) -> None:
    from django_celery_beat.models import PeriodicTask
    from django_celery_beat.schedulers import DatabaseScheduler

    from execution.exchanges.paper import PaperExchange
    from execution.models import PaperOrder
    from tradebot.beat import beat_sync
    from tradebot.celery import app

    beat_sync()
    entry = PeriodicTask.objects.get(name=f"cycle {INST}")
    assert entry.queue == "default" and entry.expire_seconds is None
    entry.kwargs = json.dumps({"as_of": OPEN_AT.isoformat()})
    entry.save()
    # Beat's own code sends the entry (what `celery beat` does on a tick).
    scheduler = DatabaseScheduler(app=app, lazy=True)
    with app.producer_or_acquire() as producer:
        scheduler.apply_entry(scheduler.all_as_schedule()[f"cycle {INST}"], producer=producer)
    deadline = time.monotonic() + 30
    while not Cycle.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    cycle = wait_done(Cycle.objects.get().pk, workers)
    assert cycle.outcome == CycleOutcome.TRADED, (cycle.reason, workers.worker_logs())
    assert cycle.stage_times["trigger"] == "beat"
    expected = {stage: queue for stage, _, queue in STAGES}
    for stage, queue in expected.items():
        assert cycle.stage_times[stage]["queue"] == queue, stage
        assert cycle.stage_times[stage]["done"] is True
    trade = Trade.objects.get()
    assert trade.cycle_id == cycle.pk and trade.status == "open" and trade.direction == "LONG"
    assert cycle.order["state"] == "FILLED" and cycle.decision["decision"]["action"] == "OPEN_LONG"

    # The next cycle sees the open position: the screener is bypassed and the rules brain holds.
    nxt = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT + timedelta(minutes=5)).pk, workers)
    assert nxt.outcome == CycleOutcome.HOLD and nxt.screener_result["bypassed"] is True
    assert orders_and_trades() == (1, 1)

    # halt --flatten: no position, no algo order left.
    call_command("bot", "halt", "--reason", "test", "--flatten", "--by", "tester")
    assert PaperExchange().positions() == []
    assert not PaperOrder.objects.filter(state="live").exists()
    call_command("bot", "resume", "--by", "tester")


def test_a_cycle_without_a_signal_stops_after_screening(workers: Workers, btc: Instrument) -> None:
    cycle = wait_done(cycle_launch(instrument=btc, as_of=NO_SIGNAL_AT).pk, workers)
    assert cycle.outcome == CycleOutcome.NO_SIGNAL and cycle.state == S.DONE
    assert set(cycle.stage_times) == {"trigger", S.COLLECTING, S.SCREENING}
    assert orders_and_trades() == (0, 0)


def test_a_rejected_decision_never_reaches_the_exchange(workers: Workers, btc: Instrument) -> None:
    from execution.exchanges.paper import PaperExchange
    from execution.models import PaperAccount, PaperOrder

    PaperExchange()  # the default account, then too little money for one contract
    PaperAccount.objects.filter(name="default").update(cash="1")
    cycle = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
    assert cycle.outcome == CycleOutcome.REJECTED, cycle.reason
    assert RiskRejection.objects.filter(cycle=cycle).exists()
    assert S.EXECUTING not in cycle.stage_times
    assert orders_and_trades() == (0, 0) and not PaperOrder.objects.exists()


def test_every_task_delivered_twice_gives_one_order_and_one_trade(workers: Workers, btc: Instrument) -> None:
    cycle = cycle_open(instrument=btc, as_of=OPEN_AT_2, trigger="test")
    pipeline_chain(cycle.pk).apply_async()
    pipeline_chain(cycle.pk).apply_async()
    cycle = wait_done(cycle.pk, workers)
    time.sleep(1.0)  # let the duplicates drain
    assert cycle.outcome == CycleOutcome.TRADED
    assert orders_and_trades() == (1, 1)
    # And a late redelivery of the execute stage after the cycle ended does nothing.
    stage_signature(S.EXECUTING, cycle.pk).apply_async()
    time.sleep(1.0)
    assert orders_and_trades() == (1, 1)


def test_a_worker_killed_during_executing_is_restarted_and_the_cycle_completes_once(workers: Workers, btc: Instrument) -> None:
    cycle = cycle_open(instrument=btc, as_of=OPEN_AT, trigger="test")
    with transaction.atomic():
        # Hold inserts into the order table: the orders worker blocks inside EXECUTING.
        with connection.cursor() as cur:
            cur.execute("LOCK TABLE execution_order IN EXCLUSIVE MODE")
        pipeline_chain(cycle.pk).apply_async()
        wait_state(cycle.pk, S.EXECUTING)
        time.sleep(0.3)
        workers.kill("orders")
    time.sleep(3.5)  # past the visibility timeout: Redis hands the task out again (to the orders queue)
    workers.start("orders")
    cycle = wait_done(cycle.pk, workers)
    assert cycle.outcome == CycleOutcome.TRADED, cycle.reason
    assert cycle.stage_times[S.EXECUTING]["attempts"] == 2
    assert cycle.stage_times[S.EXECUTING]["queue"] == "orders"  # the redelivery came back on its own queue
    assert orders_and_trades() == (1, 1)


def test_a_halt_between_stages_stops_the_order(workers: Workers, btc: Instrument) -> None:
    from celery import chain

    from execution.bot import bot_halt, bot_resume

    cycle = cycle_open(instrument=btc, as_of=OPEN_AT, trigger="test")
    first, rest = STAGES[:5], STAGES[5:]
    chain(*(stage_signature(stage, cycle.pk) for stage, _, _ in first)).apply_async()
    deadline = time.monotonic() + 30
    while not (Cycle.objects.get(pk=cycle.pk).stage_times.get(S.RISK_CHECK) or {}).get("done"):
        assert time.monotonic() < deadline, workers.worker_logs()
        time.sleep(0.05)
    bot_halt(reason="a person pressed halt", by="tester")
    chain(*(stage_signature(stage, cycle.pk) for stage, _, _ in rest)).apply_async()
    cycle = wait_done(cycle.pk, workers)
    assert cycle.outcome == CycleOutcome.HALTED and "a person pressed halt" in cycle.reason
    assert orders_and_trades() == (0, 0)
    bot_resume(by="tester")


def test_a_tick_while_a_cycle_runs_records_a_skip_and_queues_nothing(workers: Workers, btc: Instrument) -> None:
    from tradebot.tasks import cycle_start

    running = cycle_open(instrument=btc, as_of=OPEN_AT, trigger="test")
    Cycle.objects.filter(pk=running.pk).update(state=S.ANALYZING)
    cycle_start.apply_async(args=[INST], kwargs={"as_of": (OPEN_AT + timedelta(minutes=5)).isoformat()}, queue="default")
    deadline = time.monotonic() + 20
    while not Cycle.objects.filter(state=S.SKIPPED).exists():
        assert time.monotonic() < deadline, workers.worker_logs()
        time.sleep(0.05)
    skipped = Cycle.objects.get(state=S.SKIPPED)
    assert f"previous cycle {running.pk} still ANALYZING" in skipped.reason
    time.sleep(0.5)
    assert Cycle.objects.count() == 2 and workers.queue_lengths() == {"okx": 0, "orders": 0, "llm": 0, "reflection": 0,
                                                               "default": 0}


def test_replay_gives_the_same_decisions_as_the_pipeline(workers: Workers, btc: Instrument) -> None:
    from journal.models import Mode
    from tradebot.replay import replay_feed, replay_run

    start = DAY  # cycles 00:05 ... 00:30: five without a signal, then the OPEN_LONG
    end = OPEN_AT
    summary = replay_run(inst_id=INST, start=start, end=end, feed=replay_feed(inst_id=INST))
    replayed = [(c.as_of, c.outcome, (c.decision or {}).get("decision", {}).get("action"))
                for c in Cycle.objects.filter(mode=Mode.REPLAY, run_id=summary.run_id).order_by("as_of")]
    live = []
    t = start + timedelta(minutes=5)
    while t <= end:
        c = wait_done(cycle_launch(instrument=btc, as_of=t).pk, workers)
        live.append((c.as_of, c.outcome, (c.decision or {}).get("decision", {}).get("action")))
        t += timedelta(minutes=5)
    assert replayed == live
    assert live[-1][2] == "OPEN_LONG" and live[0][1] == CycleOutcome.NO_SIGNAL


def post_trade_rows(trade_id: int) -> list[ReflectionLog]:
    rows = ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, trade_ids=[trade_id])
    return list(rows.order_by("id"))


def wait_reviewed(trade_id: int, workers: Workers, timeout: float = 30.0) -> ReflectionLog:
    """The trade's post-trade review as the reflection worker finished it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [r for r in post_trade_rows(trade_id) if r.status == "done"]
        if rows:
            return rows[0]
        time.sleep(0.05)
    rows = [(r.status, r.output_json) for r in post_trade_rows(trade_id)]
    raise AssertionError(f"trade {trade_id} not reviewed: {rows}\n{workers.worker_logs()}")


def assert_reviewed_once(trade_id: int, workers: Workers) -> None:
    review = wait_reviewed(trade_id, workers)
    time.sleep(1.0)  # a second review (or request) would have been queued by now
    rows = post_trade_rows(trade_id)
    assert [(r.pk, r.status) for r in rows] == [(review.pk, "done")], [(r.status, r.output_json) for r in rows]
    trade = Trade.objects.get(pk=trade_id)
    assert trade.self_review["reflection_log_id"] == review.pk and trade.self_review["brain"] == "rules"


def test_a_trade_the_brain_closes_gets_exactly_one_post_trade_review(workers: Workers, btc: Instrument) -> None:
    opened = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
    assert opened.outcome == CycleOutcome.TRADED, opened.reason
    trade = Trade.objects.get()
    # The brain's own exit: a CLOSE order in EXECUTING; no account-sync task runs in this test until below.
    closing = wait_done(cycle_launch(instrument=btc, as_of=CLOSE_AT).pk, workers)
    assert closing.outcome == CycleOutcome.TRADED and closing.decision["decision"]["action"] == "CLOSE", closing.reason
    trade.refresh_from_db()
    assert trade.status == "closed" and trade.exit_reason == "signal" and trade.pnl_usd is not None
    assert_reviewed_once(trade.pk, workers)
    # The beat's account sync afterwards (it sweeps recent closes) finds it reviewed: nothing queued twice.
    from tradebot.celery import app

    app.signature("tradebot.tasks.account_sync").set(queue="orders").apply_async()
    time.sleep(1.5)
    assert_reviewed_once(trade.pk, workers)


def test_a_trade_closed_by_halt_flatten_gets_exactly_one_post_trade_review(workers: Workers, btc: Instrument) -> None:
    opened = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
    assert opened.outcome == CycleOutcome.TRADED, opened.reason
    trade = Trade.objects.get()
    call_command("bot", "halt", "--reason", "test", "--flatten", "--by", "tester")
    try:
        trade.refresh_from_db()
        assert trade.status == "closed" and trade.exit_reason == "test"
        assert_reviewed_once(trade.pk, workers)
    finally:
        call_command("bot", "resume", "--by", "tester")


def test_sessions_the_server_ends_while_the_workers_idle_do_not_fail_the_next_cycle(
        workers: Workers, btc: Instrument) -> None:
    """What a PostgreSQL restart does to the workers' kept connections (one per worker process)."""
    first = wait_done(cycle_launch(instrument=btc, as_of=NO_SIGNAL_AT).pk, workers)
    assert first.outcome == CycleOutcome.NO_SIGNAL
    with connection.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert cur.fetchone()[0] >= 2  # at least the okx and llm workers' sessions
    time.sleep(0.2)
    cycle = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
    assert cycle.outcome == CycleOutcome.TRADED, (cycle.reason, workers.worker_logs())
    assert "db_session_ended_by_server" in workers.worker_logs()
