"""The python-telegram-bot Application: long polling (getUpdates), one handler for every text message.

The handler hands the message to `telegram_bot.commands.command_answer` on one worker
thread (Django's ORM is synchronous; one thread also keeps a chat's messages in order)
and sends the replies, each split at Telegram's 4096-character limit.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from telegram_bot.commands import ChatSession, command_answer
from telegram_bot.formatting import split_message
from telegram_bot.sender import safe_text
from tradebot.logging import get_logger

log = get_logger(__name__)


class CommandRunner:
    """Runs `command_answer` on a single thread with its own database connection."""

    def __init__(self, *, exchange: Any | None = None) -> None:
        self.session = ChatSession()
        self.exchange = exchange
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telegram-commands")

    def answer(self, chat_id: int, user: str, text: str) -> list[str]:
        close_old_connections()
        try:
            return command_answer(chat_id=chat_id, user=user, text=text, session=self.session, exchange=self.exchange)
        finally:
            close_old_connections()

    async def run(self, chat_id: int, user: str, text: str) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.answer, chat_id, user, text)

    def close(self) -> None:
        def _close() -> None:
            from django.db import connections

            connections.close_all()

        self._pool.submit(_close).result(timeout=10)
        self._pool.shutdown(wait=True)


def bot_application(*, runner: CommandRunner, token: str | None = None, base_url: str | None = None,
                    poll_timeout: float = 10.0) -> Any:
    """The Application (not started): `run_polling()` in `manage.py telegram`, `start_polling` in tests."""
    from telegram.ext import Application, MessageHandler, filters
    from telegram.request import HTTPXRequest

    t = settings.TELEGRAM_SEND_TIMEOUT_SECONDS
    app = (
        Application.builder()
        .token(token or settings.TELEGRAM_BOT_TOKEN)
        .base_url(base_url or settings.TELEGRAM_BASE_URL)
        .request(HTTPXRequest(connect_timeout=t, read_timeout=t, write_timeout=t, pool_timeout=t))
        # getUpdates waits up to the long-poll timeout on the server: the read timeout must cover it.
        .get_updates_request(HTTPXRequest(connect_timeout=t, read_timeout=poll_timeout + t, write_timeout=t))
        .build()
    )

    async def on_message(update: Any, context: Any) -> None:
        message, chat, user = update.effective_message, update.effective_chat, update.effective_user
        if message is None or chat is None or message.text is None:
            return
        name = (user.username or user.full_name or str(user.id)) if user is not None else ""
        replies = await runner.run(chat.id, name, message.text)
        for reply in replies:
            for part in split_message(reply):
                await context.bot.send_message(chat_id=chat.id, text=part)

    async def on_error(update: object, context: Any) -> None:
        log.error("telegram_handler_failed", error=safe_text(f"{type(context.error).__name__}: {context.error}"))

    app.add_handler(MessageHandler(filters.TEXT & filters.UpdateType.MESSAGE, on_message))
    app.add_error_handler(on_error)
    return app
