"""Alerts and /halt with REAL Celery workers (every pipeline queue plus `telegram`) on Redis and PostgreSQL.

Rules brain, paper exchange, synthetic market: the cycle at 00:30 on 2025-09-05 opens a
long (see tests/tradebot/test_pipeline_workers.py). The beat entry of the alert pass is
played by a thread here that sends `alerts_dispatch` to the telegram queue every 0.3 s
(what `celery beat` does every TELEGRAM_DISPATCH_SECONDS).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from execution.models import BotStatus, Order
from execution.selectors import bot_state
from journal.models import CycleOutcome, JournalEvent
from market.models import Instrument
from telegram_bot.models import AlertDelivery, DeliveryStatus
from tests.conftest import missing_service, redis_url
from tests.fakes.telegram_server import TOKEN, FakeTelegram
from tests.telegram_bot.conftest import ADMIN, READER, READER_2, STRANGER
from tests.telegram_bot.test_commands import PollingBot, ask, quiet
from tests.tradebot.test_pipeline_workers import wait_done
from tests.tradebot.workers import Workers, redis_reachable
from tradebot.celery import QUEUES
from tradebot.pipeline import cycle_launch

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

INST = "BTC-USDT-SWAP"
OPEN_AT = datetime(2025, 9, 5, 0, 30, tzinfo=UTC)
ALL_CHATS = {READER, READER_2, ADMIN}


@pytest.fixture(scope="module")
def tg_server() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture(scope="module")
def workers(django_db_setup, django_db_blocker, tmp_path_factory, tg_server):  # noqa: ANN001, ANN201
    url = redis_url()
    if not redis_reachable(url):
        missing_service(f"Redis is not reachable at {url}")
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_BASE_URL": tg_server.base_url,
           "TELEGRAM_CHAT_IDS": f"{READER},{READER_2}", "TELEGRAM_ADMIN_CHAT_IDS": str(ADMIN),
           "TELEGRAM_SEND_TIMEOUT_SECONDS": "2", "LOG_LEVEL": "DEBUG"}
    with django_db_blocker.unblock():
        w = Workers(redis_url=url, tmp=tmp_path_factory.mktemp("tg-workers"), extra_env=env)
    w.start(*QUEUES, "telegram")
    yield w
    w.stop_all()


@pytest.fixture
def telegram(workers: Workers, tg_server: FakeTelegram, settings, monkeypatch):  # noqa: ANN001, ANN201
    if tg_server.server is None:
        tg_server.start()
    tg_server.reset()
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    settings.TELEGRAM_BOT_TOKEN = TOKEN
    settings.TELEGRAM_BASE_URL = tg_server.base_url
    settings.TELEGRAM_CHAT_IDS = (READER, READER_2)
    settings.TELEGRAM_ADMIN_CHAT_IDS = (ADMIN,)
    yield tg_server
    deadline = time.monotonic() + 30  # the telegram queue drains too (wait_idle looks at the pipeline's queues)
    while workers.redis().llen(f"{workers.prefix}telegram") and time.monotonic() < deadline:
        time.sleep(0.05)
    workers.wait_idle()


@pytest.fixture
def btc(workers: Workers) -> Instrument:
    from market.feeds import synthetic_feed_from_settings
    from market.services import instruments_sync

    instruments_sync(feed=synthetic_feed_from_settings(), enable=[INST])
    return Instrument.objects.get(inst_id=INST)


@contextmanager
def beat(every: float = 0.3) -> Iterator[None]:
    """Send the alert pass to the telegram queue, as the beat entry does."""
    from telegram_bot.tasks import alerts_dispatch

    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            alerts_dispatch.apply_async(queue="telegram", expires=5)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def test_a_fill_in_the_pipeline_sends_exactly_one_message_to_each_allowed_chat(telegram, workers, btc) -> None:
    with beat():
        cycle = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
        assert cycle.outcome == CycleOutcome.TRADED, (cycle.reason, workers.worker_logs())
        sent = telegram.wait_sent(3, timeout=30)
        time.sleep(2.0)  # several more passes: nothing is sent twice
    assert len(telegram.sent) == 3, telegram.sent
    assert {m["chat_id"] for m in sent} == ALL_CHATS
    order = Order.objects.get()
    tick = Decimal("0.1")
    expected = (f"FILLED {INST}\nopen long {order.filled_size.quantize(Decimal('0.01'))} @ "
                f"{order.avg_fill_price.quantize(tick)}\nSL {order.stop_loss.quantize(tick)}  "
                f"TP {order.take_profit.quantize(tick)}\nfee {order.fee.quantize(Decimal('0.0001'))} USDT")
    assert all(m["text"] == expected for m in sent), (sent[0]["text"], expected)
    log = workers.log_path("telegram").read_text(errors="replace")
    assert "telegram_alerts" in log
    assert TOKEN.lower() not in log.lower(), "the token never appears in the worker's log"


def test_halt_from_an_admin_chat_stops_the_next_order_and_others_change_nothing(telegram, workers, btc) -> None:
    with PollingBot(), beat():
        quiet(telegram, READER, "/halt")
        quiet(telegram, STRANGER, "/halt")
        assert bot_state().state == BotStatus.RUNNING
        [reply] = ask(telegram, ADMIN, "/halt going out", username="bob_admin")
        assert reply.startswith("Bot HALTED: going out")
        cycle = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
        # The halt's own alert reaches every chat, CRITICAL.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len([m for m in telegram.sent if "[CRITICAL] HALTED" in m["text"]]) < 3:
            time.sleep(0.1)
    assert cycle.outcome == CycleOutcome.HALTED, cycle.reason
    assert not Order.objects.exists(), "no order after the halt"
    halted = [m for m in telegram.sent if m["text"].startswith("[CRITICAL] HALTED")]
    assert {m["chat_id"] for m in halted} == ALL_CHATS
    assert halted[0]["text"] == "[CRITICAL] HALTED\nbot HALTED: going out (by telegram:bob_admin)"
    assert JournalEvent.objects.filter(kind="telegram_admin_refused", data__chat_id=READER).count() == 1
    assert JournalEvent.objects.filter(kind="telegram_unauthorised", data__chat_id=STRANGER).count() == 1
    from execution.services import bot_resume

    bot_resume(by="tester")


def test_telegram_unreachable_delays_no_cycle_and_loses_no_alert(telegram, workers, btc) -> None:
    """Telegram is down for ~10 s (connection refused) while a cycle trades; kept short for the suite."""
    telegram.stop()
    down_at = time.monotonic()
    with beat():
        started = time.monotonic()
        cycle = wait_done(cycle_launch(instrument=btc, as_of=OPEN_AT).pk, workers)
        took = time.monotonic() - started
        assert cycle.outcome == CycleOutcome.TRADED, cycle.reason
        # Sends were tried and failed while the cycle ran; the cycle did not wait for them.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not AlertDelivery.objects.filter(attempts__gte=1).exists():
            time.sleep(0.1)
        failing = AlertDelivery.objects.filter(status=DeliveryStatus.QUEUED, attempts__gte=1)
        assert failing.count() == 3, list(AlertDelivery.objects.values("status", "attempts", "last_error"))
        assert all(TOKEN.lower() not in d.last_error.lower() for d in failing)
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
        assert telegram.sent == []
        telegram.start()
        sent = telegram.wait_sent(3, timeout=30)  # backoff after two failed tries is 4 s
        time.sleep(1.0)
    assert {m["chat_id"] for m in sent} == ALL_CHATS and len(telegram.sent) == 3
    assert took < 10, f"the cycle took {took:.1f} s with Telegram down"
