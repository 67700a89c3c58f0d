"""Sending queued deliveries through python-telegram-bot, and what a failure does to them.

A send pass claims due deliveries with a conditional UPDATE (a second pass, or a task
redelivered after a worker died, cannot take the same row), sends them outside any
transaction, then writes each outcome. Temporary failures (network, timeouts, 5xx,
flood control) keep the delivery QUEUED with its next attempt: after Telegram's
`retry_after` on a 429, else exponential backoff. Telegram refusing a message for good
(bad chat id, bot blocked) marks it FAILED and journals it. Error texts are redacted:
the Bot API's URL carries the token.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from journal.models import EventLevel
from journal.services import event_record
from telegram_bot.formatting import split_message
from telegram_bot.models import AlertDelivery, DeliveryStatus
from tradebot.logging import get_logger, redact

log = get_logger(__name__)
CLAIM_STALE = timedelta(minutes=5)  # a SENDING row older than this was left by a dead pass
BATCH = 50


class TelegramError(Exception):
    """A Bot API call failed; `retryable` says whether trying again later can help."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.unreachable = unreachable  # no answer at all (refused, timed out, 5xx): the next send would wait too


def safe_text(text: str) -> str:
    """`text` without the token (as configured, even if the environment does not carry it) or other secrets."""
    token = settings.TELEGRAM_BOT_TOKEN
    if token:  # any case: python-telegram-bot lower-cases some error texts, URL included
        text = re.sub(re.escape(token), "[REDACTED]", text, flags=re.IGNORECASE)
    return redact(text)


def translate(exc: BaseException) -> TelegramError:
    """python-telegram-bot's exceptions as ours, with the token taken out of the message."""
    from telegram import error as tg

    text = safe_text(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, tg.RetryAfter):
        wait = exc._retry_after  # noqa: SLF001 - a timedelta; the public property warns about its type
        return TelegramError(text, retryable=True, retry_after=max(wait.total_seconds(), 0.0))
    if isinstance(exc, (tg.BadRequest, tg.Forbidden)):
        return TelegramError(text, retryable=False)
    # NetworkError, TimedOut, InvalidToken (a person may fix the token), a 5xx: try again later.
    return TelegramError(text, retryable=True, unreachable=isinstance(exc, tg.NetworkError))


def telegram_bot_client(*, token: str | None = None, base_url: str | None = None, timeout: float | None = None) -> Any:
    """A python-telegram-bot `Bot` for the configured token and Bot API address."""
    from telegram import Bot
    from telegram.request import HTTPXRequest

    t = settings.TELEGRAM_SEND_TIMEOUT_SECONDS if timeout is None else timeout
    request = HTTPXRequest(connect_timeout=t, read_timeout=t, write_timeout=t, pool_timeout=t)
    return Bot(token=token or settings.TELEGRAM_BOT_TOKEN, base_url=base_url or settings.TELEGRAM_BASE_URL, request=request)


async def send_parts(bot: Any, *, chat_id: int, parts: list[str]) -> list[int]:
    """Send each part in order; returns the message ids. Raises TelegramError with the ones sent so far."""
    ids: list[int] = []
    for part in parts:
        try:
            message = await bot.send_message(chat_id=chat_id, text=part)
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            err = translate(exc)
            err.sent_ids = ids  # type: ignore[attr-defined]
            raise err from exc
        ids.append(message.message_id)
    return ids


@dataclass
class SendReport:
    sent: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


def deliveries_send(*, now: datetime | None = None) -> SendReport:
    """Send every due delivery once; the outcome of each is written before returning."""
    now = now or timezone.now()
    report = SendReport()
    if not settings.TELEGRAM_BOT_TOKEN:
        return report
    due = list(AlertDelivery.objects.filter(
        Q(status=DeliveryStatus.QUEUED, next_attempt_at__lte=now)
        | Q(status=DeliveryStatus.SENDING, claimed_at__lt=now - CLAIM_STALE)
    ).order_by("next_attempt_at", "id").values_list("id", "status")[:BATCH])
    claimed: list[AlertDelivery] = []
    for pk, status in due:
        if AlertDelivery.objects.filter(pk=pk, status=status).update(status=DeliveryStatus.SENDING, claimed_at=now):
            claimed.append(AlertDelivery.objects.select_related("alert").get(pk=pk))
    if not claimed:
        return report
    outcomes = asyncio.run(_send_all(claimed))
    for delivery, (ids, err) in zip(claimed, outcomes, strict=True):
        _record(delivery, ids, err, report)
    return report


async def _send_all(deliveries: list[AlertDelivery]) -> list[tuple[list[int], TelegramError | None]]:
    """Send in order; after a 429 the rest of this pass waits too (flood control is per bot), and after a send
    that got no answer (refused, timed out: Telegram unreachable or hanging) too: a pass takes at most one
    timeout, not one per queued message, so the worker is free again within TELEGRAM_SEND_TIMEOUT_SECONDS."""
    bot = telegram_bot_client()
    results: list[tuple[list[int], TelegramError | None]] = []
    blocked: TelegramError | None = None
    try:
        for d in deliveries:
            if blocked is not None:
                results.append(([], blocked))
                continue
            parts = split_message(d.alert.text)[d.parts_sent:]
            try:
                results.append((await send_parts(bot, chat_id=d.chat_id, parts=parts), None))
            except TelegramError as err:
                results.append((getattr(err, "sent_ids", []), err))
                if err.retry_after is not None or err.unreachable:
                    blocked = err
    finally:
        try:
            await bot.shutdown()
        except Exception:  # noqa: BLE001 - closing the HTTP pool after a failure is best effort
            pass
    return results


def _record(d: AlertDelivery, ids: list[int], err: TelegramError | None, report: SendReport) -> None:
    now = timezone.now()
    d.message_ids = [*d.message_ids, *ids]
    d.parts_sent += len(ids)
    d.claimed_at = None
    if err is None:
        d.status, d.sent_at, d.last_error = DeliveryStatus.SENT, now, ""
        d.attempts += 1
        d.save()
        report.sent.append(d.pk)
        return
    d.attempts += 1
    d.last_error = safe_text(str(err))[:1000]
    if err.retryable:
        wait = err.retry_after if err.retry_after is not None else min(
            settings.TELEGRAM_RETRY_FIRST_SECONDS * 2 ** min(d.attempts - 1, 30), settings.TELEGRAM_RETRY_MAX_SECONDS)
        d.status, d.next_attempt_at = DeliveryStatus.QUEUED, now + timedelta(seconds=wait)
        d.save()
        report.retry.append(d.pk)
        log.warning("telegram_send_retry", delivery_id=d.pk, alert_id=d.alert_id, attempts=d.attempts,
                    retry_in_s=round(wait, 1), error=d.last_error)
        return
    d.status = DeliveryStatus.FAILED
    d.save()
    report.failed.append(d.pk)
    event_record(kind="telegram_send_failed", level=EventLevel.ERROR,
                 message=f"alert {d.alert_id} to chat {d.chat_id} refused by Telegram: {d.last_error}",
                 data={"alert_id": d.alert_id, "chat_id": d.chat_id})


def next_due_in(*, now: datetime | None = None) -> float | None:
    """Seconds until the next queued delivery is due (None: nothing queued)."""
    now = now or timezone.now()
    nxt = (AlertDelivery.objects.filter(status=DeliveryStatus.QUEUED).order_by("next_attempt_at")
           .values_list("next_attempt_at", flat=True).first())
    return None if nxt is None else max((nxt - now).total_seconds(), 0.0)
