"""Queues stay isolated under model latency and a busy okx worker: real workers as `make run` starts them (one per
queue, the llm one on a threads pool, the orders one with two processes) on Redis and PostgreSQL, the Claude brain
against a slow local Messages API server.

The llm worker's threads are all held by a slow model, with more held calls queued behind them, and the okx worker
is held as a tick's COLLECTING tasks hold it, with more queued behind it. An approved order (risk gate on
`default`, the order on `orders`) still reaches the exchange within 2 s of its analysis, long before any held
call ends, and the account sync (`orders`), sent while every llm thread and the okx worker are held, starts at
once. (The one llm thread that served the order's own analysis is refilled from the queue a moment after it
answers, so at the order's instant the others are certainly held and that one is being refilled.) With the order
or the sync on the okx queue, as before issue 20's orders queue, both waited behind the okx holds.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from journal.models import Cycle, CycleOutcome, CycleState
from market.models import Instrument
from tests.conftest import TEST_KEY
from tests.fakes.anthropic_server import FakeAnthropic, HonestModel, Received, Reply, ok
from tests.tradebot.workers import Workers, workers_made
from tradebot.celery import app
from tradebot.pipeline import cycle_launch

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

INST = "BTC-USDT-SWAP"
OPEN_AT = datetime(2025, 9, 5, 0, 30, tzinfo=UTC)
THREADS = 3
HOLD_SECONDS = 4.0
OKX_HOLDS = 3  # the okx worker is held for OKX_HOLDS x HOLD_SECONDS once the cycle's own COLLECTING is done


class SlowModel:
    """The cycle's screener and analyst answer at once; `hold` calls take HOLD_SECONDS. The analyst's answer waits
    until the other threads are all held (and `okx_busy()`), so that when its thread frees a queued hold takes it."""

    def __init__(self, *, okx_busy: Callable[[], bool]) -> None:
        self.okx_busy = okx_busy
        self.lock = threading.Lock()
        self.holds: list[list[float]] = []  # [start, end] per hold call (end 0 while in flight)
        self.analyst_started = threading.Event()
        self.analyst_answered = 0.0

    def in_flight(self, at: float) -> int:
        with self.lock:
            return sum(1 for start, end in self.holds if start <= at and (end == 0 or end >= at))

    def handle(self, received: Received) -> Reply:
        body = received.json()
        user = "".join(HonestModel._text(m.get("content")) for m in body["messages"])
        if user.startswith("hold "):
            window = [time.time(), 0.0]
            with self.lock:
                self.holds.append(window)
            time.sleep(HOLD_SECONDS)
            window[1] = time.time()
            return ok(data={"signal": False, "reason": "held"}, model=body["model"])
        purpose = HonestModel.purpose_of(body)
        if purpose == "screen":
            return ok(data={"signal": True, "reason": "pullback"}, model=body["model"])
        self.analyst_started.set()
        deadline = time.monotonic() + 20
        while (self.in_flight(time.time()) < THREADS - 1 or not self.okx_busy()) and time.monotonic() < deadline:
            time.sleep(0.01)
        answer = HonestModel(open_rate=1.0)._answer("analyze", user, random.Random(1))
        self.analyst_answered = time.time()
        return ok(data=answer, model=body["model"])


@pytest.fixture(scope="module")
def model_server():  # noqa: ANN201
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(scope="module")
def workers(django_db_setup, django_db_blocker, tmp_path_factory, model_server):  # noqa: ANN001, ANN201
    w = workers_made(django_db_blocker, tmp_path_factory, "llm-busy", app_module="tests.tradebot.llm_busy_app",
                     pools={"llm": ("threads", THREADS), "orders": ("prefork", 2)},
                     extra_env={"BRAIN": "claude", "ANTHROPIC_API_KEY": TEST_KEY, "ANTHROPIC_BASE_URL": model_server.url})
    w.start_all()
    yield w
    w.stop_all()


def okx_windows(workers: Workers) -> list[tuple[float, float]]:
    """[start, end] of each okx hold (end = +inf while it runs), from what the okx worker pushed to Redis."""
    from tests.tradebot.llm_busy_app import OKX_HOLD_KEY

    marks = [v.decode().split() for v in workers.redis().lrange(workers.prefix + OKX_HOLD_KEY, 0, -1)]
    starts = [float(t) for kind, t in marks if kind == "start"]
    ends = [float(t) for kind, t in marks if kind == "end"]
    return [(start, ends[i] if i < len(ends) else float("inf")) for i, start in enumerate(starts)]


def okx_held_at(windows: list[tuple[float, float]], at: float) -> bool:
    return any(start <= at <= end for start, end in windows)


def test_an_approved_order_and_the_account_sync_wait_for_no_model_call_and_no_collecting(
        workers: Workers, model_server: FakeAnthropic, settings) -> None:  # noqa: ANN001
    from execution.models import Order
    from market.feeds import synthetic_feed_from_settings
    from market.services import instruments_sync
    from tests.tradebot.llm_busy_app import SYNC_KEY

    settings.BRAIN, settings.ANTHROPIC_API_KEY, settings.ANTHROPIC_BASE_URL = "claude", TEST_KEY, model_server.url
    model = SlowModel(okx_busy=lambda: okx_held_at(okx_windows(workers), time.time()))
    model_server.handler(model.handle)
    instruments_sync(feed=synthetic_feed_from_settings(), enable=[INST])
    cycle = cycle_launch(instrument=Instrument.objects.get(inst_id=INST), as_of=OPEN_AT)
    assert model.analyst_started.wait(30), workers.worker_logs()
    # The cycle's COLLECTING is done: now the okx worker is held, with more queued behind it (a tick's COLLECTING).
    for _ in range(OKX_HOLDS):
        app.send_task("tests.okx_hold", args=[HOLD_SECONDS], queue="okx")
    # THREADS + 1 hold calls: one on the free thread now, the others queued for the threads as they free.
    for i in range(THREADS + 1):
        app.send_task("tests.llm_hold", args=[str(i)], queue="llm")
    deadline = time.monotonic() + 20
    while (model.in_flight(time.time()) < THREADS or not okx_held_at(okx_windows(workers), time.time())) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    sync_sent = time.time()
    app.send_task("tradebot.tasks.account_sync")  # by name, as beat sends it: the router picks its queue

    deadline = time.monotonic() + 30
    ended = (CycleState.DONE, CycleState.FAILED)
    while Cycle.objects.get(pk=cycle.pk).state not in ended and time.monotonic() < deadline:
        time.sleep(0.05)
    cycle.refresh_from_db()
    assert cycle.outcome == CycleOutcome.TRADED, (cycle.state, cycle.reason, workers.worker_logs())
    order = Order.objects.get(cycle_id=cycle.pk)
    placed, filled = order.created_at.timestamp(), order.updated_at.timestamp()
    assert cycle.order["state"] == "FILLED"
    # The order was written (before the exchange call) and filled while the other llm threads were held, within the
    # issue's 2 s of the analyst's answer (about 0.6 s here; up to 1.3 s seen on the loaded 2-core machine: the
    # analysis's write-back, the risk gate and two hops come first), long before any held call or the okx holds
    # ended: it waited behind no model call and no COLLECTING (routed to the okx queue, it was placed only after
    # every held model call had ended).
    assert model.in_flight(placed) >= THREADS - 1 and model.in_flight(filled) >= THREADS - 1
    assert placed - model.analyst_answered < 2.0, (placed - model.analyst_answered, cycle.stage_times)
    assert filled < min(start for start, _ in model.holds) + HOLD_SECONDS
    assert cycle.stage_times["EXECUTING"]["queue"] == "orders"
    assert Cycle.objects.filter(pk=cycle.pk, stage_times__ANALYZING__queue="llm").exists()
    # The account sync started at once on its own worker, with the llm threads and the okx worker still held.
    started = float(workers.redis().lpop(workers.prefix + SYNC_KEY) or 0)
    assert 0 < started - sync_sent < 2.0 and model.in_flight(started) == THREADS, (started - sync_sent, model.holds)
    workers.wait_idle(timeout=60)
    windows = okx_windows(workers)
    # ... and the okx worker was held (queued holds, one after the other, as a tick's COLLECTING tasks) from before
    # the order until after it and the sync.
    assert len(windows) == OKX_HOLDS and all(end < float("inf") for _, end in windows), windows
    busy = (min(start for start, _ in windows), max(end for _, end in windows))
    assert busy[0] < placed < filled < busy[1] and busy[0] < started < busy[1], (busy, placed, filled, started)
    assert len(model.holds) == THREADS + 1 and all(end for _, end in model.holds)
