"""Celery tasks of the Telegram layer: thin, each calls one service and owns only its limits.

`alerts_dispatch` runs on the `telegram` queue (beat every TELEGRAM_DISPATCH_SECONDS;
consumed by the worker `manage.py telegram` starts), so a slow or unreachable Telegram
holds only that worker: no pipeline stage ever waits on it. Retries live in the outbox
rows (`AlertDelivery.next_attempt_at`: backoff, or Telegram's `retry_after`), so a
worker that dies loses nothing; the next tick sends what is due.
"""
from __future__ import annotations

from typing import Any

from celery import Task

from tradebot.celery import app

QUEUE = "telegram"


@app.task(name="telegram_bot.tasks.alerts_dispatch", bind=True, acks_late=True, max_retries=0,
          soft_time_limit=120, time_limit=150)
def alerts_dispatch(self: Task) -> dict[str, Any]:
    from telegram_bot.services import alerts_dispatch_run

    return alerts_dispatch_run()


@app.task(name="telegram_bot.tasks.reflect_now", bind=True, acks_late=True, max_retries=0,
          soft_time_limit=900, time_limit=960)
def reflect_now(self: Task, requested_by: str = "") -> int | None:
    """`/reflect`: the deep reflection now; a candidate goes to validation like the beat's."""
    from telegram_bot.services import reflection_run_now

    return reflection_run_now(requested_by=requested_by)
