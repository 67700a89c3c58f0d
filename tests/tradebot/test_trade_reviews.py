"""Every closed trade gets exactly one post-trade review, whatever closed it.

The service that decides what to queue (`tradebot.reflection.trade_reviews_request`) and the review
task's body (`trade_review_request`) are called directly here; the real-worker runs of the close paths
(the brain's CLOSE, `bot halt --flatten`) are in test_pipeline_workers.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone

from brain.claude import ClaudeBrain
from brain.rules import RulesBrain
from brain.schemas import TradeReview, TradeView
from journal.models import Cycle, JournalEvent, Mode, ReflectionLog, ReflectionType, Trade, TradeStatus
from market.models import Instrument
from tests.fakes.anthropic_server import FakeAnthropic, ok
from tradebot.reflection import (
    REQUESTED,
    REVIEW_MAX_ATTEMPTS,
    REVIEW_RETRY_AFTER,
    trade_review_request,
    trade_reviews_request,
)

BTC = "BTC-USDT-SWAP"


def btc_row() -> Instrument:
    return Instrument.objects.create(inst_id=BTC, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"))


@pytest.fixture
def instrument(db: None) -> Instrument:
    return btc_row()


def trade(instrument: Instrument, *, status: str = TradeStatus.CLOSED, mode: str = Mode.LIVE,
          run_id: str = "") -> Trade:
    # Closed within the hour: a review does not make the deep reflection due (every 6 h or 20 trades).
    opened = timezone.now() - timedelta(hours=2)
    closed = status == TradeStatus.CLOSED
    return Trade.objects.create(
        instrument=instrument, mode=mode, run_id=run_id, opened_at=opened, direction="LONG",
        closed_at=opened + timedelta(hours=1) if closed else None, entry_price=Decimal("70000"),
        exit_price=Decimal("70500") if closed else None, stop_loss=Decimal("69500"), take_profit=Decimal("71000"),
        size=Decimal("1"), pnl_usd=Decimal("5") if closed else None, strategy_used="momentum_breakout",
        market_regime="trending_up", confidence_at_entry=Decimal("0.6"), exit_reason="signal" if closed else "",
        status=status, reasoning="breakout",
    )


def post_trade_rows(trade_id: int) -> list[tuple[str, dict]]:
    return [(r.status, r.output_json) for r in ReflectionLog.objects.filter(
        reflection_type=ReflectionType.POST_TRADE, trade_ids=[trade_id]).order_by("id")]


def sent_trade_ids(callbacks: list[Any]) -> list[int]:
    """The trades whose review task the captured on-commit callbacks would send."""
    return [cb.keywords["trade_id"] for cb in callbacks]


def test_a_closed_trade_is_queued_for_review_once_whoever_asks(
        instrument: Instrument, django_capture_on_commit_callbacks: Callable) -> None:
    t = trade(instrument)
    # The account sync names the trade it closed: a request row, and the task is sent only on commit.
    with django_capture_on_commit_callbacks() as sent:
        assert trade_reviews_request(trade_ids=[t.pk], requested_by="account_sync") == [t.pk]
    assert sent_trade_ids(sent) == [t.pk]
    assert [status for status, _ in post_trade_rows(t.pk)] == [REQUESTED]
    # The brain's CLOSE stage, a flatten, the next sync's sweep: each finds it claimed.
    with django_capture_on_commit_callbacks() as again:
        assert trade_reviews_request(requested_by="cycle 9 CLOSE") == []
        assert trade_reviews_request(trade_ids=[t.pk], requested_by="account_sync") == []
    assert again == [] and len(post_trade_rows(t.pk)) == 1


def test_only_closed_bot_trades_without_a_review_are_queued(
        instrument: Instrument, django_capture_on_commit_callbacks: Callable) -> None:
    open_trade = trade(instrument, status=TradeStatus.OPEN)
    replayed = trade(instrument, mode=Mode.REPLAY, run_id="run-x")
    reviewed = trade(instrument)
    ReflectionLog.objects.create(reflection_type=ReflectionType.POST_TRADE, status="done", trade_ids=[reviewed.pk])
    old = trade(instrument)
    Trade.objects.filter(pk=old.pk).update(updated_at=timezone.now() - timedelta(days=2))  # closed two days ago
    fresh = trade(instrument)
    with django_capture_on_commit_callbacks() as sent:
        assert trade_reviews_request(since=timezone.now()) == []  # nothing closed since now
        assert trade_reviews_request() == [fresh.pk]  # the sweep: closes in the last REVIEW_SWEEP_HOURS only
    assert sent_trade_ids(sent) == [fresh.pk]
    with django_capture_on_commit_callbacks() as sent:
        # Named by its closer, an older close is queued too; an open, a replay or a reviewed trade never.
        named = [old.pk, open_trade.pk, replayed.pk, reviewed.pk]
        assert trade_reviews_request(trade_ids=named, sweep=False) == [old.pk]
    assert sent_trade_ids(sent) == [old.pk]
    assert post_trade_rows(open_trade.pk) == [] and post_trade_rows(replayed.pk) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def broker_at(url: str, *, transport_options: dict | None = None) -> Iterator[None]:
    """Point this process's Celery app at another broker (a refusing port, a private Redis prefix), then back."""
    from tradebot.celery import app

    keys = ("broker_url", "broker_transport", "broker_transport_options")
    saved = {k: app.conf.get(k) for k in keys}
    app.conf.update(broker_url=url, broker_transport=None, broker_transport_options=transport_options or {})
    app._pool = None  # noqa: SLF001 - rebuild the connection and producer pools for the new broker
    app.amqp._producer_pool = None  # noqa: SLF001
    try:
        yield
    finally:
        app.conf.update(saved)
        app._pool = None  # noqa: SLF001
        app.amqp._producer_pool = None  # noqa: SLF001


@pytest.mark.django_db(transaction=True)
def test_a_review_the_broker_refused_is_queued_again_by_the_next_sweep(
        django_capture_on_commit_callbacks: Callable) -> None:
    t = trade(btc_row())
    with broker_at(f"redis://127.0.0.1:{_free_port()}/0"):  # nothing listens there: the send fails
        started = time.monotonic()
        assert trade_reviews_request(trade_ids=[t.pk]) == [t.pk]  # claimed; the send after commit failed ...
        assert time.monotonic() - started < 30
    assert post_trade_rows(t.pk) == []  # ... and gave the claim back
    with transaction.atomic():  # rolled back below: the send is captured, never made
        with django_capture_on_commit_callbacks() as sent:
            assert trade_reviews_request() == [t.pk]  # the next sweep (the beat's account sync) claims it again
        assert sent_trade_ids(sent) == [t.pk] and [s for s, _ in post_trade_rows(t.pk)] == [REQUESTED]
        transaction.set_rollback(True)


def test_the_review_task_run_twice_reviews_once_and_replaces_the_request(
        instrument: Instrument, settings: Any, django_capture_on_commit_callbacks: Callable) -> None:
    settings.BRAIN = "rules"
    t = trade(instrument)
    with django_capture_on_commit_callbacks():
        trade_reviews_request(trade_ids=[t.pk])
    first = trade_review_request(trade_id=t.pk)
    second = trade_review_request(trade_id=t.pk)  # a duplicate delivery
    assert first == second and first is not None
    rows = post_trade_rows(t.pk)
    assert [s for s, _ in rows] == ["done"] and rows[0][1]["review"]["outcome"] == "win"
    t.refresh_from_db()
    assert t.self_review["reflection_log_id"] == first
    with django_capture_on_commit_callbacks() as sent:
        assert trade_reviews_request(trade_ids=[t.pk]) == []  # reviewed: never queued again
    assert sent == []


def test_a_queued_review_that_manage_py_reflect_did_first_only_clears_its_request(
        instrument: Instrument, settings: Any, django_capture_on_commit_callbacks: Callable) -> None:
    from brain.reflection import trade_review_run

    settings.BRAIN = "rules"
    t = trade(instrument)
    with django_capture_on_commit_callbacks():
        trade_reviews_request(trade_ids=[t.pk])
    done = trade_review_run(trade_id=t.pk)  # what `manage.py reflect` does, before the queued task runs
    assert sorted(s for s, _ in post_trade_rows(t.pk)) == ["done", REQUESTED]
    assert trade_review_request(trade_id=t.pk) == done.pk
    assert [s for s, _ in post_trade_rows(t.pk)] == ["done"]


def test_a_review_left_running_by_a_dead_worker_is_finished_when_the_task_comes_again(
        instrument: Instrument, settings: Any) -> None:
    settings.BRAIN = "rules"
    t = trade(instrument)
    # The worker that started it is gone (no such process on this host); its lease has not expired yet.
    dead_pid = 2 ** 22 + 12345
    with contextlib.suppress(ProcessLookupError):
        os.kill(dead_pid, 0)
        pytest.skip("the made-up pid exists here")
    until = (timezone.now() + timedelta(minutes=10)).isoformat()
    lease = {"owner": f"{socket.gethostname()}:{dead_pid}", "until": until}
    running = ReflectionLog.objects.create(reflection_type=ReflectionType.POST_TRADE, status="running",
                                           trade_ids=[t.pk], output_json={"lease": lease})
    assert trade_review_request(trade_id=t.pk) == running.pk
    running.refresh_from_db()
    assert running.status == "done" and running.output_json["review"]["outcome"] == "win"


class BrainBug(RuntimeError):
    """A defect in our own brain code.

    The network boundary can no longer make a review raise: the LLM gateway turns every API or proxy
    trouble into an "error" result and the Claude brain then gives the rules review. A bug in the brain
    is what is left, so these tests stand one in for it.
    """


def review_with_a_bug(self: Any, *, trade: TradeView, cycle_id: int | None = None, mode: str = "live") -> TradeReview:
    """A brain's `review_trade` with a bug in it (monkeypatched onto the brain class in use)."""
    raise BrainBug(f"review of trade {trade.id} hit a bug")


REVIEW = {"outcome": "win", "execution_quality": "good", "entry_timing": "good", "exit_timing": "early",
          "what_went_right": ["trend followed"], "what_went_wrong": [], "lesson": "let winners run", "should_update_playbook": False}


def test_a_review_that_raised_is_failed_visibly_and_the_sweep_queues_it_again_after_a_wait(
        instrument: Instrument, anthropic_server: FakeAnthropic, monkeypatch: pytest.MonkeyPatch,
        django_capture_on_commit_callbacks: Callable) -> None:
    t = trade(instrument)
    with django_capture_on_commit_callbacks():
        assert trade_reviews_request(trade_ids=[t.pk]) == [t.pk]
    anthropic_server.script(ok(data=REVIEW))
    with monkeypatch.context() as patch:
        patch.setattr(ClaudeBrain, "review_trade", review_with_a_bug)  # stands for a bug in the brain
        with pytest.raises(BrainBug):  # the task body re-raises: the Celery task fails (acked, not redelivered)
            trade_review_request(trade_id=t.pk)
    # The request is gone; the failed review stays, with its error, and is journaled.
    rows = post_trade_rows(t.pk)
    assert [s for s, _ in rows] == ["failed"] and "claude brain failed: BrainBug" in rows[0][1]["error"]
    assert JournalEvent.objects.get(kind="trade_review_failed").data["trade_id"] == t.pk
    with django_capture_on_commit_callbacks() as sent:
        assert trade_reviews_request() == []  # the next account sync: too soon to ask the brain again
        later = timezone.now() + REVIEW_RETRY_AFTER
        assert trade_reviews_request(now=later) == [t.pk]  # a failed review is no review: queued again
        assert trade_reviews_request(now=later) == []  # once
    assert sent_trade_ids(sent) == [t.pk]
    done = trade_review_request(trade_id=t.pk)  # the bug is fixed: the review goes to the API
    assert [s for s, _ in post_trade_rows(t.pk)] == ["failed", "done"]
    t.refresh_from_db()
    assert t.self_review["reflection_log_id"] == done and t.self_review["lesson"] == "let winners run"
    with django_capture_on_commit_callbacks() as sent:
        assert trade_reviews_request(now=later + REVIEW_RETRY_AFTER) == []  # reviewed: never queued again
    assert sent == []


def test_a_review_that_keeps_failing_is_left_to_manage_py_reflect_after_the_last_attempt(
        instrument: Instrument, anthropic_server: FakeAnthropic, monkeypatch: pytest.MonkeyPatch,
        django_capture_on_commit_callbacks: Callable) -> None:
    from brain.reflection import trade_review_run

    t = trade(instrument)
    anthropic_server.script(ok(data=REVIEW))
    now = timezone.now()
    with monkeypatch.context() as patch:
        patch.setattr(ClaudeBrain, "review_trade", review_with_a_bug)  # stands for a bug in the brain: every attempt
        for attempt in range(REVIEW_MAX_ATTEMPTS):
            now += REVIEW_RETRY_AFTER
            with django_capture_on_commit_callbacks():
                assert trade_reviews_request(now=now) == [t.pk], f"attempt {attempt + 1}"
            with pytest.raises(BrainBug):
                trade_review_request(trade_id=t.pk)
    assert [s for s, _ in post_trade_rows(t.pk)] == ["failed"] * REVIEW_MAX_ATTEMPTS
    assert JournalEvent.objects.filter(kind="trade_review_failed").count() == REVIEW_MAX_ATTEMPTS
    with django_capture_on_commit_callbacks() as sent:
        assert trade_reviews_request(now=now + 10 * REVIEW_RETRY_AFTER) == []  # the sweep gives up on it ...
    assert sent == []
    assert anthropic_server.calls("POST", "/v1/messages") == []  # the bug struck before any request
    assert trade_review_run(trade_id=t.pk).status == "done"  # ... `manage.py reflect` still reviews it, once fixed


def test_manage_py_reflect_reviews_the_other_trades_then_fails_naming_the_one_whose_review_raised(
        instrument: Instrument, settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.BRAIN = "rules"
    first, second = trade(instrument), trade(instrument)  # reviewed in close order: the failing one first
    reviewed_ok = RulesBrain.review_trade

    def review_trade(self: RulesBrain, *, trade: TradeView, cycle_id: int | None = None,
                     mode: str = "live") -> TradeReview:
        if trade.id == first.pk:
            return review_with_a_bug(self, trade=trade, cycle_id=cycle_id, mode=mode)
        return reviewed_ok(self, trade=trade, cycle_id=cycle_id, mode=mode)

    monkeypatch.setattr(RulesBrain, "review_trade", review_trade)  # stands for a bug in the brain, for one trade
    out = StringIO()
    with pytest.raises(CommandError) as raised:
        call_command("reflect", "--json", stdout=out)
    message = str(raised.value)
    assert message.startswith("1 post-trade review(s) failed")
    assert f"trade {first.pk}: BrainBug: review of trade {first.pk} hit a bug" in message
    assert f"trade {second.pk}" not in message
    # The failed one is FAILED with its error; the other was reviewed after it.
    rows = post_trade_rows(first.pk)
    assert [s for s, _ in rows] == ["failed"] and "rules brain failed: BrainBug" in rows[0][1]["error"]
    assert [s for s, _ in post_trade_rows(second.pk)] == ["done"]
    second.refresh_from_db()
    assert second.self_review["outcome"] == "win"
    printed = json.loads(out.getvalue())
    statuses = [(r["trade_id"], r["status"]) for r in printed["post_trade_reviews"]]
    assert statuses == [(first.pk, "failed"), (second.pk, "done")]
    assert printed["reflection"] == "not_due"  # the deep reflection ran after the reviews (not due yet)


def test_a_close_order_in_executing_asks_for_the_review_and_an_open_order_does_not(
        db: None, settings: Any, django_capture_on_commit_callbacks: Callable) -> None:
    """The stage tasks' code in this process (no broker): the brain's CLOSE at 05:00 of the seeded market."""
    import tradebot.tasks as stage_tasks
    from execution.exchanges.paper import PaperExchange
    from market.feeds.synthetic import SyntheticFeed
    from market.services import instruments_sync
    from tradebot.celery import app
    from tradebot.cycle import cycle_open
    from tradebot.pipeline import STAGE_TASK_NAMES
    from tradebot.stages import STAGES, StageEnv

    settings.BRAIN = "rules"
    day = datetime(2025, 9, 5, tzinfo=UTC)  # seed 7: OPEN_LONG at 00:30, the rules brain's CLOSE at 05:00
    feed = SyntheticFeed(seed=7)
    instruments_sync(feed=feed, enable=[BTC])
    btc = Instrument.objects.get(inst_id=BTC)
    stage_tasks._ENV = StageEnv(feed=feed, exchange=PaperExchange())  # noqa: SLF001
    stage_tasks._PAPER_VENUE = True  # noqa: SLF001

    def run(as_of: datetime) -> Cycle:
        cycle = cycle_open(instrument=btc, as_of=as_of, trigger="test")
        for stage, _, _ in STAGES:
            if app.tasks[STAGE_TASK_NAMES[stage]].apply(args=(cycle.pk,)).get() is None:
                break
        cycle.refresh_from_db()
        return cycle

    try:
        with django_capture_on_commit_callbacks() as sent:
            assert run(day + timedelta(minutes=30)).decision["decision"]["action"] == "OPEN_LONG"
        assert sent == []  # an opening order closes nothing: no review is asked for
        opened = Trade.objects.get()
        earlier = trade(btc)  # closed before the CLOSE cycle by another path: the beat's sweep covers it
        with django_capture_on_commit_callbacks() as sent:
            closing = run(day + timedelta(hours=5))
        assert closing.decision["decision"]["action"] == "CLOSE"
    finally:
        stage_tasks.env_reset()
    opened.refresh_from_db()
    assert opened.status == TradeStatus.CLOSED and post_trade_rows(opened.pk) == []
    # The stage sends one sweep task (after its write-back), for the trades closed while it ran.
    assert [cb.keywords["requested_by"] for cb in sent] == [f"cycle {closing.pk} CLOSE"]
    since = sent[0].keywords["since"]
    assert since == closing.stage_times["EXECUTING"]["started"]
    # That task's body, on the reflection queue: the trade the CLOSE closed is queued for its review.
    with django_capture_on_commit_callbacks() as queued:
        assert stage_tasks.reflection_reviews_sweep.run(requested_by="cycle CLOSE", since=since) == [opened.pk]
    assert sent_trade_ids(queued) == [opened.pk] and [s for s, _ in post_trade_rows(opened.pk)] == [REQUESTED]
    assert post_trade_rows(earlier.pk) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_on_postgresql_two_closers_at_once_queue_one_review(require_redis: str) -> None:
    """The account sync and the CLOSE stage both find the trade unclaimed; the row lock lets one claim it.

    The sends go to the real Redis under a key prefix of this test's own: exactly one message arrives.
    """
    import redis
    from django.db import connection, connections, transaction

    prefix = f"tbtest-reviews-{os.getpid()}:"
    t = trade(btc_row())
    queued: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def closer(name: str) -> None:
        try:
            queued[name] = trade_reviews_request(trade_ids=[t.pk], requested_by=name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connections.close_all()

    def waiting_on_locks() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")  # inside a transaction the view is read once otherwise
            cur.execute("SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'")
            return int(cur.fetchone()[0])

    client = redis.Redis.from_url(require_redis)
    with broker_at(require_redis, transport_options={"global_keyprefix": prefix}):
        try:
            with transaction.atomic():
                # Hold the trade row: both closers pass the unlocked check, then queue up behind this lock.
                list(Trade.objects.select_for_update().filter(pk=t.pk).values_list("pk", flat=True))
                threads = [threading.Thread(target=closer, args=(name,)) for name in ("account_sync", "cycle CLOSE")]
                for th in threads:
                    th.start()
                deadline = time.monotonic() + 20
                while waiting_on_locks() < 2:
                    assert time.monotonic() < deadline, "both closers should be waiting on the trade's row lock"
                    time.sleep(0.02)
            for th in threads:
                th.join(timeout=20)
            assert not errors, errors
            assert sorted(len(ids) for ids in queued.values()) == [0, 1]
            assert [s for s, _ in post_trade_rows(t.pk)] == [REQUESTED]
            assert client.llen(f"{prefix}reflection") == 1  # one review task on the reflection queue
        finally:
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)
