"""Commands through python-telegram-bot's long polling (getUpdates) against the local Bot API server."""
from __future__ import annotations

import asyncio
import threading
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.utils import timezone

from execution.models import BotStatus
from execution.selectors import bot_state
from journal.models import JournalEvent, Mode, Trade, TradeStatus
from market.models import Instrument
from telegram_bot.bot import CommandRunner, bot_application
from telegram_bot.commands import ChatSession, command_answer
from tests.fakes.telegram_server import FakeTelegram
from tests.telegram_bot.conftest import ADMIN, READER, STRANGER
from tests.tradebot.test_stream_okx import memory_broker  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db(transaction=True)


class PollingBot:
    """The real Application polling in a thread of its own (as `manage.py telegram` runs it)."""

    def __init__(self, *, exchange: Any | None = None) -> None:
        self.runner = CommandRunner(exchange=exchange)
        self.app = bot_application(runner=self.runner, poll_timeout=1)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            await self.app.initialize()
            await self.app.updater.start_polling(timeout=1, poll_interval=0)
            await self.app.start()

        self.loop.run_until_complete(start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> PollingBot:
        self.thread.start()
        assert self.ready.wait(15), "the bot did not start polling"
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            await self.app.updater.stop()
            await self.app.stop()
            await self.app.shutdown()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.runner.close()


def ask(telegram: FakeTelegram, chat_id: int, text: str, *, replies: int = 1, username: str = "ann_trader") -> list[str]:
    before = len(telegram.sent)
    telegram.push_message(chat_id=chat_id, text=text, username=username)
    sent = telegram.wait_sent(before + replies)
    return [m["text"] for m in sent[before:] if m["chat_id"] == chat_id]


def quiet(telegram: FakeTelegram, chat_id: int, text: str, *, wait: float = 1.5) -> None:
    """A message that must get no answer; waits until the bot has consumed it."""
    before = len(telegram.sent)
    update_id = telegram.push_message(chat_id=chat_id, text=text, username="mallory")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(u["update_id"] == update_id for u in telegram._updates):  # noqa: SLF001
        time.sleep(0.05)
    time.sleep(wait)  # the handler runs after the update is taken
    assert len(telegram.sent) == before, telegram.sent[before:]


def test_unknown_commands_and_malformed_arguments_get_a_one_line_help(telegram, btc: Instrument) -> None:
    with PollingBot():
        assert ask(telegram, READER, "/moon") == ["Unknown command /moon. Try /help"]
        assert ask(telegram, READER, "/trades abc") == ["Usage: /trades [n] - the last n trades (default 5)"]
        assert ask(telegram, READER, "/performance -3") == [
            "Usage: /performance [days] - closed trades over the last days (default 7)"]
        [nope] = ask(telegram, ADMIN, "/cycle NOPE")
        assert nope == ("Unknown instrument NOPE. Trading: BTC-USDT-SWAP. Usage: /cycle INST - run one cycle now, "
                        "e.g. /cycle BTC-USDT-SWAP")
        assert ask(telegram, ADMIN, "/cycle") == ["Usage: /cycle INST - run one cycle now, e.g. /cycle BTC-USDT-SWAP"]
    assert "\n" not in nope


def test_a_reply_longer_than_the_limit_is_split_not_dropped(telegram, btc: Instrument) -> None:
    now = timezone.now()
    for i in range(50):
        Trade.objects.create(instrument=btc, mode=Mode.LIVE, opened_at=now - timedelta(hours=i + 1), closed_at=now,
                             duration_seconds=3600, direction="LONG", entry_price=Decimal("61234.5"),
                             exit_price=Decimal("61300"), stop_loss=Decimal("60000"), size=Decimal("1"),
                             pnl_usd=Decimal("0.65"), pnl_pct=Decimal("0.002"), exit_reason="take_profit",
                             status=TradeStatus.CLOSED)
    with PollingBot():
        parts = ask(telegram, READER, "/trades 50", replies=2)
    assert len(parts) == 2 and all(len(p) <= 4096 for p in parts)
    text = "\n".join(parts)
    assert text.count("closed 61300.0 take_profit: 0.65 USDT (+0.2%) in 1h00m") == 50


def test_read_commands_answer_an_allowed_chat(telegram, btc: Instrument) -> None:
    with PollingBot():
        [status] = ask(telegram, READER, "/status")
        [cost] = ask(telegram, READER, "/cost")
        [positions] = ask(telegram, READER, "/positions")
    assert status.startswith("State RUNNING\nEquity 10000.00 USDT\nToday PnL 0.00 USDT")
    assert "BTC-USDT-SWAP: none yet" in status
    assert cost.startswith("LLM cost today: $0.0000")
    assert positions == "No open positions."


def test_halt_from_an_admin_chat_halts_and_is_journaled_with_the_chat_user(telegram, btc: Instrument) -> None:
    with PollingBot():
        [reply] = ask(telegram, ADMIN, "/halt going to sleep", username="bob_admin")
    assert reply.startswith("Bot HALTED: going to sleep")
    view = bot_state()
    assert (view.state, view.by, view.reason) == (BotStatus.HALTED, "telegram:bob_admin", "going to sleep")
    assert view.until is None, "a person's halt does not lift itself at midnight"
    assert JournalEvent.objects.get(kind="bot_halted").message == "bot HALTED: going to sleep (by telegram:bob_admin)"


def test_halt_from_a_reader_or_an_unknown_chat_changes_nothing_and_is_journaled_once_an_hour(telegram, btc) -> None:
    with PollingBot():
        quiet(telegram, READER, "/halt")
        quiet(telegram, STRANGER, "/halt")
        quiet(telegram, STRANGER, "/status", wait=0.5)
        quiet(telegram, STRANGER, "/flatten", wait=0.5)
    assert bot_state().state == BotStatus.RUNNING
    refused = JournalEvent.objects.get(kind="telegram_admin_refused")
    assert refused.data == {"chat_id": READER, "user": "mallory", "command": "halt"}
    unknown = JournalEvent.objects.filter(kind="telegram_unauthorised")
    assert unknown.count() == 1, "once per chat and hour"
    assert unknown.get().data["chat_id"] == STRANGER


def test_flatten_without_its_confirmation_does_nothing(telegram, paper) -> None:
    from tests.execution.test_services import open_trade

    open_trade(paper)
    with PollingBot(exchange=paper):
        [asked] = ask(telegram, ADMIN, "/flatten")
        assert asked.startswith("This halts the bot and closes EVERY position at market.\nReply YES")
        assert ask(telegram, ADMIN, "/status") and len(paper.positions()) == 1
        # Another command came in between: the confirmation was dropped, so YES is just text.
        [after] = ask(telegram, ADMIN, "YES")
        assert after.startswith("Commands:")
    assert bot_state().state == BotStatus.RUNNING and len(paper.positions()) == 1


def test_flatten_with_its_confirmation_halts_and_closes_every_position(paper) -> None:
    from tests.execution.test_services import open_trade

    open_trade(paper)
    session = ChatSession()
    now = timezone.now()
    answer = lambda text, at=now: command_answer(chat_id=ADMIN, user="bob", text=text, session=session,  # noqa: E731
                                                  now=at, exchange=paper)
    assert answer("/flatten")[0].startswith("This halts the bot")
    assert answer("no") == ["Not confirmed: nothing was done."]
    assert len(paper.positions()) == 1 and bot_state().state == BotStatus.RUNNING
    answer("/flatten")
    assert answer("YES", now + timedelta(seconds=61)) == ["Too late: /flatten again to be asked again. Nothing was done."]
    assert len(paper.positions()) == 1
    answer("/flatten")
    assert answer("yes", now + timedelta(seconds=5)) == ["Bot HALTED. Flattened: 1 close order(s) sent."]
    assert paper.positions() == [] and Trade.objects.get().exit_reason == "flatten"
    assert bot_state().by == "telegram:bob"


@pytest.fixture
def chats(settings):  # noqa: ANN001, ANN201
    settings.TELEGRAM_CHAT_IDS = (READER,)
    settings.TELEGRAM_ADMIN_CHAT_IDS = (ADMIN,)


@pytest.fixture
def paper(btc: Instrument, settings):  # noqa: ANN001, ANN201
    from execution.exchanges.paper import PaperExchange

    settings.TELEGRAM_CHAT_IDS = (READER,)
    settings.TELEGRAM_ADMIN_CHAT_IDS = (ADMIN,)
    return PaperExchange(start_balance=Decimal("10000"), slippage=Decimal("0.0005"), taker_fee=Decimal("0.0005"),
                         maker_fee=Decimal("0.0002"), maint_margin_rate=Decimal("0.004"))


def test_the_other_admin_commands_go_through_the_bots_services_journaled_with_the_chat_user(btc, chats, memory_broker) -> None:
    from brain.models import PlaybookVersion
    from execution.bot import bot_halt
    from journal.models import Cycle
    from tradebot.celery import app

    session = ChatSession()

    def admin(text: str) -> list[str]:
        return command_answer(chat_id=ADMIN, user="bob_admin", text=text, session=session)

    bot_halt(reason="daily loss", by="system")
    assert admin("/resume") == ["Bot RUNNING."]
    assert bot_state().by == "telegram:bob_admin"
    [started] = admin("/cycle btc-usdt-swap")
    cycle = Cycle.objects.get()
    assert started == f"Cycle #{cycle.pk} for BTC-USDT-SWAP sent to the workers."
    assert cycle.stage_times["trigger"] == "manual"  # as `manage.py bot run-cycle` opens it: the screener bypassed
    assert JournalEvent.objects.get(kind="telegram_cycle_requested").message.endswith("requested by telegram:bob_admin")
    assert admin("/reflect") == ["Deep reflection queued. The result comes as an alert (playbook promoted or refused)."]
    with app.connection_for_read() as conn:
        queued = conn.SimpleQueue("reflection").get(timeout=2)
        assert queued.headers["task"] == "telegram_bot.tasks.reflect_now"
        assert queued.payload[1] == {"requested_by": "telegram:bob_admin"}
        queued.ack()
    assert PlaybookVersion.objects.count() <= 1  # queued, not run here
    assert admin("/resume now") == ["Usage: /resume - back to RUNNING"]


def test_performance_and_playbook_answer_with_their_fields(btc, chats) -> None:
    from brain.models import PlaybookTrigger
    from brain.playbook import playbook_current, playbook_save

    now = timezone.now()
    for pnl in ("12.5", "-4.25", "7"):
        Trade.objects.create(instrument=btc, mode=Mode.LIVE, opened_at=now - timedelta(hours=3), closed_at=now - timedelta(hours=1),
                             duration_seconds=7200, direction="LONG", entry_price=Decimal("61234.5"),
                             exit_price=Decimal("61300"), stop_loss=Decimal("60000"), size=Decimal("1"),
                             pnl_usd=Decimal(pnl), pnl_pct=Decimal("0.01"), exit_reason="signal", status=TradeStatus.CLOSED)
    session = ChatSession()
    [perf] = command_answer(chat_id=READER, user="ann", text="/performance 3", session=session)
    lines = perf.split("\n")
    assert lines[0] == "Last 3 day(s): 3 trades, 2 won, 1 lost"
    assert lines[1].startswith("Win rate +66.7%  PF 4.59") and lines[2].startswith("PnL 15.25 USDT")
    current = playbook_current()
    playbook_save(data=current.playbook, change_summary="tighter stops in ranging markets",
                  triggered_by=PlaybookTrigger.MANUAL)
    [book] = command_answer(chat_id=READER, user="ann", text="/playbook", session=session)
    assert book.startswith(f"Playbook v{current.version} active since ")
    assert f"Newer v{current.version + 1}: waiting for validation" in book


def test_an_unknown_chat_is_journaled_again_after_an_hour(btc, chats) -> None:
    session = ChatSession()
    now = timezone.now()
    for minutes in (0, 10, 59):
        assert command_answer(chat_id=STRANGER, user="eve", text="/status", session=session,
                              now=now + timedelta(minutes=minutes)) == []
    assert JournalEvent.objects.filter(kind="telegram_unauthorised").count() == 1
    later = JournalEvent.objects.get()
    JournalEvent.objects.filter(pk=later.pk).update(created_at=now - timedelta(minutes=61))  # an hour has passed
    command_answer(chat_id=STRANGER, user="eve", text="/status", session=session, now=now)
    assert JournalEvent.objects.filter(kind="telegram_unauthorised").count() == 2
