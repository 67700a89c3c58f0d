"""Alerts from journal rows to the local Bot API server: fields, severity, cooldown, silent hours, retries, secrets."""
from __future__ import annotations

import io
import logging
import socket
import time
from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
from django.utils import timezone

from execution.models import Order, OrderState
from execution.bot import bot_halt
from journal.models import JournalEvent, Mode, Trade, TradeStatus
from market.models import Instrument
from telegram_bot.alerts import silent_until
from telegram_bot.formatting import split_message
from telegram_bot.models import Alert, AlertDelivery, DeliveryStatus
from telegram_bot.services import alerts_dispatch_run
from tests.conftest import FIXTURES
from tests.fakes.http_server import Reply
from tests.fakes.telegram_server import TOKEN, fixture, retry_after_reply
from tests.telegram_bot.conftest import ADMIN, READER, READER_2
from tradebot.logging import configure_logging

pytestmark = pytest.mark.django_db
ALL_CHATS = {READER, READER_2, ADMIN}


def filled_order(n: int = 1, *, size: str = "3", px: str = "61234.56") -> Order:
    """An order as execution leaves it once the exchange filled it."""
    return Order.objects.create(
        client_order_id=f"tb{n:030d}", exchange="paper", inst_id="BTC-USDT-SWAP", action="OPEN_LONG", side="buy",
        pos_side="long", order_type="market", size=Decimal(size), state=OrderState.FILLED, filled_size=Decimal(size),
        avg_fill_price=Decimal(px), stop_loss=Decimal("60012.04"), take_profit=Decimal("63000"), fee=Decimal("0.0918"),
        approved={"kind": "open"}, mode=Mode.LIVE,
    )


def test_a_fill_becomes_exactly_one_message_per_chat_with_its_fields(telegram, btc: Instrument) -> None:
    filled_order()
    alerts_dispatch_run()
    alerts_dispatch_run()  # a second pass (the next beat tick) finds nothing new
    sent = telegram.wait_sent(3)
    time.sleep(0.2)
    assert len(telegram.sent) == 3
    assert {m["chat_id"] for m in sent} == ALL_CHATS
    text = sent[0]["text"]
    # Price at the tick size (0.1), contracts at the lot size (0.01), the fee to 4 places.
    assert text == ("FILLED BTC-USDT-SWAP\nopen long 3.00 @ 61234.6\nSL 60012.0  TP 63000.0\nfee 0.0918 USDT")
    assert AlertDelivery.objects.filter(status=DeliveryStatus.SENT).count() == 3


def test_a_closed_trade_says_pnl_and_exit_reason_and_a_stop_is_a_warning(telegram, btc: Instrument) -> None:
    now = timezone.now()
    Trade.objects.create(instrument=btc, mode=Mode.LIVE, opened_at=now - timedelta(hours=2, minutes=5), closed_at=now,
                         duration_seconds=7500, direction="LONG", entry_price=Decimal("61234.5"),
                         exit_price=Decimal("60012.0"), stop_loss=Decimal("60012"), size=Decimal("3"),
                         pnl_usd=Decimal("-37.2231"), pnl_pct=Decimal("-0.0607"), exit_reason="stop_loss",
                         status=TradeStatus.CLOSED)
    alerts_dispatch_run()
    text = telegram.wait_sent(3)[0]["text"]
    assert text == ("[WARN] STOP LOSS hit BTC-USDT-SWAP long\nPnL -37.22 USDT (-6.1%)\n"
                    "entry 61234.5  exit 60012.0\nreason stop_loss  held 2h05m")
    assert Alert.objects.get().alert_type == "sl_hit"


def test_the_exchange_answering_again_is_critical_when_a_position_lacks_its_exchange_side_stop(telegram) -> None:
    from execution.exchanges.base import Position
    from execution.outages import exchange_outage_end, exchange_unreachable_record

    exchange_unreachable_record(error="ConnectError", where="account sync")
    exchange_outage_end(positions=[Position(inst_id="BTC-USDT-SWAP", pos_side="long", size=Decimal("3"),
                                            avg_px=Decimal("61234.5"), stop_loss=None, take_profit=None)])
    alerts_dispatch_run()
    heads = sorted({m["text"].split("\n")[0] for m in telegram.wait_sent(6)})  # each alert to each of 3 chats
    assert heads == ["[CRITICAL] Exchange answers again: a position lacks its exchange-side stop",
                     "[WARN] Exchange unreachable"], heads


def test_the_cooldown_merges_repeated_alerts_of_one_type(telegram, btc: Instrument) -> None:
    filled_order(1)
    alerts_dispatch_run()
    telegram.wait_sent(3)
    filled_order(2, px="61300")
    filled_order(3, px="61400")
    alerts_dispatch_run()
    time.sleep(0.3)
    assert len(telegram.sent) == 3, "repeats within the cooldown wait"
    waiting = Alert.objects.get(status="pending")
    assert waiting.held_reason == "cooldown" and len(waiting.lines) == 2
    alerts_dispatch_run(now=timezone.now() + timedelta(seconds=61))
    merged = telegram.wait_sent(6)[3:]
    assert {m["chat_id"] for m in merged} == ALL_CHATS
    assert merged[0]["text"].startswith("2x order filled (held: cooldown)")
    assert "@ 61300.0" in merged[0]["text"] and "@ 61400.0" in merged[0]["text"]


def test_silent_hours_hold_an_info_alert_and_let_a_critical_through(telegram, settings, btc: Instrument) -> None:
    now = timezone.now()
    settings.TELEGRAM_SILENT_HOURS = f"{now.hour}-{(now.hour + 2) % 24}"
    filled_order()
    bot_halt(reason="daily loss limit", by="system")
    alerts_dispatch_run()
    sent = telegram.wait_sent(3)
    time.sleep(0.3)
    assert len(telegram.sent) == 3
    assert all(m["text"].startswith("[CRITICAL] HALTED\nbot HALTED: daily loss limit (by system)") for m in sent)
    held = Alert.objects.get(status="pending")
    assert held.alert_type == "order_filled" and held.held_reason == "silent_hours"
    assert held.send_after == silent_until(now)
    alerts_dispatch_run(now=held.send_after + timedelta(seconds=1))
    assert telegram.wait_sent(6)[3]["text"].startswith("FILLED BTC-USDT-SWAP")


def test_silent_hours_wrap_past_midnight() -> None:
    at = timezone.now().replace(hour=23, minute=30, second=0, microsecond=0)
    assert silent_until(at, "22-07") == (at + timedelta(days=1)).replace(hour=7, minute=0)
    assert silent_until(at.replace(hour=12), "22-07") is None
    assert silent_until(at.replace(hour=3), "22-07") == at.replace(hour=7, minute=0)


def test_a_429_with_retry_after_delays_the_send_and_it_still_arrives(telegram, btc: Instrument) -> None:
    telegram.fail_next(retry_after_reply(2))
    filled_order()
    first = alerts_dispatch_run()
    assert first["retry"] == 3, "after a 429 the rest of the pass waits too"
    d = AlertDelivery.objects.order_by("next_attempt_at").first()
    assert "retry in 2" in d.last_error.lower() or "retry_after" in d.last_error.lower() or "flood" in d.last_error.lower()
    assert alerts_dispatch_run()["sent"] == 0, "not before retry_after"
    deadline = time.monotonic() + 10
    while len(telegram.sent) < 3 and time.monotonic() < deadline:
        alerts_dispatch_run()  # what the beat does every TELEGRAM_DISPATCH_SECONDS
        time.sleep(0.2)
    assert {m["chat_id"] for m in telegram.sent} == ALL_CHATS
    assert telegram.sent[0]["at"] - telegram.send_attempts[0] >= 2.0


def test_telegram_unreachable_loses_no_alert(telegram, btc: Instrument) -> None:
    telegram.stop()
    filled_order()
    result = alerts_dispatch_run()
    assert result["retry"] == 3 and result["sent"] == 0
    row = AlertDelivery.objects.first()
    assert row.status == DeliveryStatus.QUEUED and row.attempts == 1 and TOKEN not in row.last_error
    telegram.start()  # back, on the same port
    assert alerts_dispatch_run(now=timezone.now() + timedelta(seconds=3))["sent"] == 3
    assert {m["chat_id"] for m in telegram.wait_sent(3)} == ALL_CHATS


def test_a_refused_message_is_journaled_and_the_token_never_leaks(telegram, btc: Instrument) -> None:
    """Telegram's error quotes the request URL, which carries the token: logs, rows and journal stay clean."""
    url = f"{telegram.base_url}{TOKEN}/sendMessage"
    body = fixture("error_400_chat_not_found")
    body["description"] = f"Bad Request: chat not found (POST {url})"
    not_found = fixture("error_404_not_found")
    not_found["description"] = f"Not Found: {url}"
    telegram.fail_next(Reply(400, body), Reply(404, not_found))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    configure_logging(level="DEBUG")  # python-telegram-bot logs its API URL at DEBUG
    root.handlers[0].setStream(stream)
    try:
        filled_order()
        result = alerts_dispatch_run()
    finally:
        configure_logging(level="INFO")
        handler.close()
    assert result["failed"] == 1 and result["retry"] == 1 and result["sent"] == 1
    logs = stream.getvalue()
    assert "telegram_send_failed" in logs and "[REDACTED]" in logs
    assert TOKEN not in logs
    failed = AlertDelivery.objects.get(status=DeliveryStatus.FAILED)
    assert "chat not found" in failed.last_error.lower()
    assert TOKEN.lower() not in logs.lower()
    assert all(TOKEN.lower() not in d.last_error.lower() for d in AlertDelivery.objects.all())
    event = JournalEvent.objects.get(kind="telegram_send_failed")
    assert "[REDACTED]" in event.message
    assert not any(TOKEN.lower() in str(v).lower() for v in JournalEvent.objects.values_list("message", "data"))


def test_a_long_text_is_split_at_the_limit_not_dropped() -> None:
    text = "\n".join(f"line {i:04d} " + "x" * 90 for i in range(100))
    parts = split_message(text)
    assert len(parts) == 3 and all(len(p) <= 4096 for p in parts)
    assert "\n".join(parts) == text
    unbroken = "y" * 9000
    assert [len(p) for p in split_message(unbroken)] == [4096, 4096, 808]


def test_fixtures_have_the_bot_api_envelope() -> None:
    for path in (FIXTURES / "telegram").glob("*.json"):
        body = fixture(path.stem)
        assert isinstance(body["ok"], bool)
        assert ("result" in body) if body["ok"] else {"error_code", "description"} <= set(body)


def test_a_hanging_telegram_costs_a_pass_one_timeout_not_one_per_queued_message(telegram, settings, btc) -> None:
    """Telegram accepts and never answers: the first send times out and the rest of the pass waits with it
    (the worker is free again after one timeout; every delivery stays queued and counts the attempt)."""
    settings.TELEGRAM_SEND_TIMEOUT_SECONDS = 0.5
    telegram.hang()
    filled_order()
    result = alerts_dispatch_run()
    telegram.hang(False)
    assert result["retry"] == 3 and result["sent"] == 0
    assert len(telegram.hung) == 1, "one request (one timeout), not one per chat"
    assert all(d.status == DeliveryStatus.QUEUED and d.attempts == 1 and "Timed out" in d.last_error
               for d in AlertDelivery.objects.all())


def test_the_retry_backoff_doubles_from_2s_to_a_60s_cap(telegram, settings, btc) -> None:
    assert (settings.TELEGRAM_RETRY_FIRST_SECONDS, settings.TELEGRAM_RETRY_MAX_SECONDS) == (2.0, 60.0)
    settings.TELEGRAM_CHAT_IDS, settings.TELEGRAM_ADMIN_CHAT_IDS = (READER,), ()
    telegram.stop()  # refused
    filled_order()
    now = timezone.now()
    waits = []
    for _ in range(8):
        alerts_dispatch_run(now=now)
        d = AlertDelivery.objects.get()
        waits.append(round((d.next_attempt_at - timezone.now()).total_seconds()))
        now = d.next_attempt_at
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]
    assert d.attempts == 8 and d.status == DeliveryStatus.QUEUED


def closed_trade(btc: Instrument, *, exit_reason: str, pnl: str, exit_price: str) -> Trade:
    now = timezone.now()
    return Trade.objects.create(instrument=btc, mode=Mode.LIVE, opened_at=now - timedelta(minutes=95), closed_at=now,
                                duration_seconds=5700, direction="LONG", entry_price=Decimal("61234.5"),
                                exit_price=Decimal(exit_price), stop_loss=Decimal("60012"), take_profit=Decimal("63100"),
                                size=Decimal("3"), pnl_usd=Decimal(pnl), pnl_pct=Decimal(pnl) / 600,
                                exit_reason=exit_reason, status=TradeStatus.CLOSED)


def test_every_alert_the_issue_lists_comes_from_what_the_services_journal(telegram, settings, btc, monkeypatch) -> None:
    """TP hit and a close with its PnL and reason; halt, emergency halt, cooldown and resume; the LLM budget at 80%
    and degrade mode; cycles failing repeatedly; the exchange unreachable; a playbook refused with its reason.
    (The fill and the stop loss: tests above; a promotion: the kinds test below.) Each from the service that
    journals it, each with its severity."""
    from brain.budget import budget_check
    from brain.models import PlaybookTrigger
    from brain.playbook import playbook_current, playbook_save
    from execution.exchanges.okx import OkxExchange
    from execution.bot import bot_resume, risk_trade_closed
    from journal.models import Cycle, CycleOutcome, CycleState, LlmCall
    from tradebot import tasks
    from tradebot.learning import playbook_candidate_validate
    from tradebot.stages import CycleWork

    settings.TELEGRAM_COOLDOWN_SECONDS = 0
    settings.TELEGRAM_CHAT_IDS, settings.TELEGRAM_ADMIN_CHAT_IDS = (READER,), ()
    now = timezone.now()
    closed_trade(btc, exit_reason="take_profit", pnl="48.1234", exit_price="63100")
    closed_trade(btc, exit_reason="signal", pnl="-3.205", exit_price="61180.04")
    bot_halt(reason="daily loss -3.02%", by="system")
    bot_resume(by="telegram:ann")
    settings.MAX_CONSECUTIVE_LOSSES = 1
    risk_trade_closed(pnl=Decimal("-5"), now=now)  # the loss streak: COOLDOWN
    bot_halt(reason="drawdown -10.4% from peak", by="system", emergency=True)
    settings.LLM_DAILY_BUDGET_USD = Decimal("10")
    LlmCall.objects.create(purpose="analyze", model="claude-opus-4-6", prompt={}, cost_usd=Decimal("8.2"))
    budget_check(now=now)
    LlmCall.objects.create(purpose="analyze", model="claude-opus-4-6", prompt={}, cost_usd=Decimal("2"))
    budget_check(now=now)
    for _ in range(3):  # COLLECTING fails as a stage does when OKX does not answer
        cycle = Cycle.objects.create(instrument=btc, as_of=now, state=CycleState.COLLECTING)
        tasks._fail(CycleWork(cycle=cycle), CycleState.COLLECTING,  # noqa: SLF001 - what a failing stage calls
                    "FeedTemporaryError: OKX unreachable: ConnectError: [Errno 111] Connection refused", outcome=CycleOutcome.ERROR)
        cycle.save()
    with socket.socket() as s:  # the account sync against an OKX that refuses connections
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    okx = OkxExchange(api_key="k" * 8, api_secret="s" * 8, passphrase="p" * 8, base_url=closed, timeout=0.5,
                      max_retries=0)
    monkeypatch.setattr(tasks, "live_env", lambda **_: SimpleNamespace(exchange=okx))  # the worker's exchange handle
    tasks.account_sync.apply()
    same = playbook_save(data=playbook_current().playbook, change_summary="no change", triggered_by=PlaybookTrigger.MANUAL)
    playbook_candidate_validate(candidate_id=same.pk)

    alerts_dispatch_run()
    texts = [m["text"] for m in telegram.wait_sent(11)]
    time.sleep(0.2)
    assert len(telegram.sent) == 11, [m["text"][:60] for m in telegram.sent]
    heads = sorted(t.split("\n")[0] for t in texts)
    assert heads == sorted([
        "TAKE PROFIT hit BTC-USDT-SWAP long", "CLOSED BTC-USDT-SWAP long",
        "[CRITICAL] HALTED", "RESUMED", "[WARN] COOLDOWN", "[CRITICAL] EMERGENCY HALT",
        "[WARN] LLM budget", "[WARN] LLM degrade mode",
        "[CRITICAL] 3 cycles in a row FAILED for BTC-USDT-SWAP",
        "[WARN] 4x exchange unreachable",  # the three cycles and the account sync, merged into one message
        "[WARN] Playbook refused"]), heads
    by_head = {t.split("\n")[0]: t for t in texts}
    assert by_head["TAKE PROFIT hit BTC-USDT-SWAP long"] == (
        "TAKE PROFIT hit BTC-USDT-SWAP long\nPnL 48.12 USDT (+8.0%)\nentry 61234.5  exit 63100.0\n"
        "reason take_profit  held 1h35m")
    assert "PnL -3.21 USDT" in by_head["CLOSED BTC-USDT-SWAP long"] and "reason signal" in by_head["CLOSED BTC-USDT-SWAP long"]
    assert "1 consecutive losses" in by_head["[WARN] COOLDOWN"]
    assert "drawdown -10.4% from peak" in by_head["[CRITICAL] EMERGENCY HALT"]
    assert by_head["[WARN] LLM budget"] == ("[WARN] LLM budget\nLLM spending at 82% of the daily budget "
                                            "($8.20 of $10.00, today)")
    assert "LLM budget exhausted: $10.20 of $10.00 today; degrade mode (rules)" in by_head["[WARN] LLM degrade mode"]
    assert "Connection refused" in by_head["[CRITICAL] 3 cycles in a row FAILED for BTC-USDT-SWAP"]
    unreachable = by_head["[WARN] 4x exchange unreachable"]
    assert unreachable.count("cycle ") == 3 and "COLLECTING: FeedTemporaryError: OKX unreachable" in unreachable
    assert ("exchange unreachable (account sync: OKX connection failed: ConnectError: [Errno 111] Connection refused): "
            "no new entries until it answers; open positions are protected by their exchange-side stops") in unreachable
    assert f"playbook v{same.version} rejected" in by_head["[WARN] Playbook refused"]
    assert "nothing to promote" in by_head["[WARN] Playbook refused"]


def test_every_alerted_event_kind_is_one_the_apps_journal() -> None:
    """A kind renamed in the service would silently end its alert: each mapped kind is written somewhere."""
    import re

    from execution.models import BotStatus
    from telegram_bot.alerts import EVENT_ALERTS

    root = FIXTURES.parents[1]
    written = {f"bot_{s.lower()}" for s in BotStatus.values}  # execution.services: kind=f"bot_{to.lower()}"
    for app in ("execution", "brain", "journal", "market", "tradebot"):
        for path in (root / app).rglob("*.py"):
            written |= set(re.findall(r'"([a-z_]+)"', path.read_text()))
    assert set(EVENT_ALERTS) - written == set()
    assert {"playbook_promoted", "playbook_rejected"} <= written
