"""Alerts and /halt with REAL Celery workers (every pipeline queue plus `telegram`) on Redis and PostgreSQL.

Rules brain, paper exchange, synthetic market: the cycle at 00:30 on 2025-09-05 opens a
long (see tests/tradebot/test_pipeline_workers.py). The beat entry of the alert pass is
played by a thread here that sends `alerts_dispatch` to the telegram queue every 0.3 s
(what `celery beat` does every TELEGRAM_DISPATCH_SECONDS).
"""
from __future__ import annotations

import os
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
from tests.fakes.telegram_server import TOKEN, FakeTelegram
from tests.telegram_bot.conftest import ADMIN, READER, READER_2, STRANGER
from tests.telegram_bot.test_commands import PollingBot, ask, quiet
from tests.tradebot.test_pipeline_workers import wait_done
from tests.tradebot.workers import Workers, workers_made
from tradebot.celery import QUEUES
from tradebot.pipeline import cycle_launch

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

INST = "BTC-USDT-SWAP"
# The outage test's clock: its minute lasts 60 / CLOCK s, with every Telegram timing scaled to match.
CLOCK = float(os.environ.get("TELEGRAM_OUTAGE_CLOCK", "6"))
OPEN_AT = datetime(2025, 9, 5, 0, 30, tzinfo=UTC)
ALL_CHATS = {READER, READER_2, ADMIN}


@pytest.fixture(scope="module")
def tg_server() -> Iterator[FakeTelegram]:
    with FakeTelegram() as server:
        yield server


@pytest.fixture(scope="module")
def workers(django_db_setup, django_db_blocker, tmp_path_factory, tg_server):  # noqa: ANN001, ANN201
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_BASE_URL": tg_server.base_url,
           "TELEGRAM_CHAT_IDS": f"{READER},{READER_2}", "TELEGRAM_ADMIN_CHAT_IDS": str(ADMIN),
           "TELEGRAM_SEND_TIMEOUT_SECONDS": str(10 / CLOCK), "TELEGRAM_RETRY_FIRST_SECONDS": str(2 / CLOCK),
           "TELEGRAM_RETRY_MAX_SECONDS": str(60 / CLOCK), "TELEGRAM_COOLDOWN_SECONDS": str(int(60 / CLOCK)),
           "LOG_LEVEL": "DEBUG"}
    w = workers_made(django_db_blocker, tmp_path_factory, "tg-workers", extra_env=env)
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
    from execution.bot import bot_resume

    bot_resume(by="tester")


def test_telegram_unreachable_for_a_minute_delays_no_cycle_and_loses_no_alert(telegram, workers, btc) -> None:
    """A minute of Telegram down, on a clock CLOCK times faster: the send timeout, the retry backoff, the cooldown
    and the beat interval are all scaled by it (module env), so the sends fail, back off and pile up as in a real
    minute (6 attempts per delivery, the backoff reaching its cap). First half: connection refused; second
    half: Telegram accepts and never answers (each send waits for its timeout). Cycles run back to back all the
    while; then Telegram comes back and every alert arrives exactly once. TELEGRAM_OUTAGE_CLOCK=1 runs a real minute.
    """
    from execution.bot import bot_halt, bot_resume
    from telegram_bot.models import Alert, AlertStatus

    minute, timeout = 60 / CLOCK, 10 / CLOCK
    telegram.stop()
    cycles: list[tuple[float, float, str]] = []  # (started, ended, outcome), monotonic
    as_of = OPEN_AT
    with beat(every=5 / CLOCK):
        # The first cycle opens the long: its fill alert is the first one queued; the minute counts from there
        # (a worker's first cycle can take seconds: the outage is then a little longer, never shorter).
        began = time.monotonic()
        cycle = wait_done(cycle_launch(instrument=btc, as_of=as_of).pk, workers)
        cycles.append((began, time.monotonic(), cycle.outcome))
        as_of += timedelta(minutes=5)
        down_at = time.monotonic()
        while time.monotonic() - down_at < minute:
            if time.monotonic() - down_at >= minute / 2 and telegram.server is None:
                telegram.start()
                telegram.hang()  # from here every send is accepted and left unanswered
            began = time.monotonic()
            cycle = wait_done(cycle_launch(instrument=btc, as_of=as_of).pk, workers)
            cycles.append((began, time.monotonic(), cycle.outcome))
            assert cycle.state == "DONE", (cycle.state, cycle.reason)
            as_of += timedelta(minutes=5)
        bot_halt(reason="outage drill", by="tester")  # a CRITICAL alert and an INFO one, still during the outage
        bot_resume(by="tester")
        time.sleep(3 * 5 / CLOCK)  # a few more passes against the hanging Telegram
        assert telegram.sent == [], "nothing got through while Telegram was down"
        deliveries = list(AlertDelivery.objects.all())
        assert deliveries and all(d.status in (DeliveryStatus.QUEUED, DeliveryStatus.SENDING) for d in deliveries)
        first = min(deliveries, key=lambda d: d.id)
        # A real minute of failures: tries at 0, 2, 6, 14, 30 s (backoff 2 s doubling; the next at 62 s). The
        # scaled clock scales the waits but not the worker's own time per pass (~0.3-2.5 s here), so fewer fit.
        assert first.attempts >= (5 if CLOCK == 1 else 3), f"{first.attempts} attempts"
        assert all(TOKEN.lower() not in d.last_error.lower() for d in deliveries)
        # A cycle ran from start to end while a send to Telegram was hanging: no stage waits for Telegram.
        assert telegram.hung, "the hanging Telegram was asked"
        assert any(h <= began and ended <= h + timeout for h in telegram.hung for began, ended, _ in cycles), (
            telegram.hung, cycles)
        assert cycles[0][2] == CycleOutcome.TRADED
        back_at = time.monotonic()
        telegram.hang(False)
        deadline = back_at + 60 / CLOCK + 4 * 5 / CLOCK + 2 * timeout + 15  # backoff cap + passes + slack
        while time.monotonic() < deadline and (
                AlertDelivery.objects.exclude(status=DeliveryStatus.SENT).exists()
                or Alert.objects.filter(status=AlertStatus.PENDING).exists()):
            time.sleep(0.1)
        arrived = time.monotonic() - back_at
        time.sleep(2 * 5 / CLOCK)  # more passes: nothing is sent twice
    alerts = list(Alert.objects.order_by("id"))
    assert all(a.status == AlertStatus.DISPATCHED for a in alerts), [(a.alert_type, a.status) for a in alerts]
    assert AlertDelivery.objects.filter(status=DeliveryStatus.SENT).count() == 3 * len(alerts), (
        list(AlertDelivery.objects.values("status", "attempts", "last_error")))
    sent = sorted((m["chat_id"], m["text"]) for m in telegram.sent)
    assert sent == sorted((chat, a.text) for a in alerts for chat in ALL_CHATS), "each alert once to each chat"
    kinds = {a.alert_type for a in alerts}
    assert {"order_filled", "bot_halted", "bot_resumed"} <= kinds, kinds
    print(f"Telegram down {minute:.0f} s (clock x{CLOCK:g}); {len(cycles)} cycles meanwhile, "  # noqa: T201
          f"longest {max(e - b for b, e, _ in cycles):.2f} s; {len(alerts)} alerts all arrived {arrived:.1f} s "
          f"after Telegram came back")
