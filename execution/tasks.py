"""Thin Celery tasks over execution services (the pipeline chains the rest)."""
from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from execution.exchanges import ExchangeTemporaryError, exchange_from_settings
from execution.bot import risk_daily_reset
from execution.sync import account_sync


@shared_task(bind=True, autoretry_for=(ExchangeTemporaryError,), retry_backoff=True, max_retries=3, soft_time_limit=60)
def account_sync_task(self: object, mode: str = "live") -> dict[str, object]:
    result = account_sync(exchange=exchange_from_settings(), mode=mode)
    return {"equity": str(result.equity), "closed_trade_ids": result.closed_trade_ids, "orders_updated": result.orders_updated}


@shared_task(bind=True, autoretry_for=(ExchangeTemporaryError,), retry_backoff=True, max_retries=3, soft_time_limit=60)
def risk_daily_reset_task(self: object) -> str:
    exchange = exchange_from_settings()
    view = risk_daily_reset(now=timezone.now(), equity=exchange.account().equity)
    return view.state
