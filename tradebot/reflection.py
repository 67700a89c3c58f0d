"""Glue between account sync, the brain's reflection and execution's daily reset.

`trade_review_request` runs the brain's post-trade review for a closed trade
(`brain.reflection.trade_review_run`) when that service exists in this build;
otherwise it records the request in the journal as a pending post-trade
ReflectionLog, so no closed trade goes unreviewed silently. It is idempotent:
a trade that already has a post-trade review is not reviewed twice.
"""
from __future__ import annotations

import importlib
from typing import Any

from journal.models import ReflectionLog, ReflectionType, Trade
from journal.services import event_record
from tradebot.logging import get_logger

log = get_logger(__name__)


def _service(module: str, name: str) -> Any | None:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def trade_review_request(*, trade_id: int) -> int | None:
    """Review one closed trade (or record the request); returns the ReflectionLog id."""
    trade = Trade.objects.filter(pk=trade_id).first()
    if trade is None:
        log.warning("trade_review_missing_trade", trade_id=trade_id)
        return None
    done = ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, trade_ids=[trade_id]).exclude(status="failed").first()
    if done is not None and done.status != "requested":
        return done.pk
    review = _service("brain.reflection", "trade_review_run")
    if review is not None:
        result = review(trade_id=trade_id)
        if done is not None:
            done.delete()  # the request placeholder: the real review replaces it
        deep_reflection_if_due(mode=trade.mode)
        return getattr(result, "pk", None) or getattr(result, "id", None)
    if done is not None:
        return done.pk
    entry = ReflectionLog.objects.create(
        reflection_type=ReflectionType.POST_TRADE, mode=trade.mode, status="requested", trade_ids=[trade_id],
        input_prompt="", output_json={"requested_by": "account_sync", "reason": "post-trade review requested"},
    )
    event_record(kind="trade_review_requested", message=f"post-trade review requested for trade {trade_id}",
                 instrument_id=trade.instrument_id, mode=trade.mode)
    return entry.pk


def deep_reflection_if_due(*, mode: str) -> int | None:
    """Every REFLECTION_INTERVAL_TRADES closed trades or REFLECTION_INTERVAL_HOURS: the deep reflection.

    A candidate playbook it proposes is sent to validation (reflection queue)
    right away; returns the candidate's PlaybookVersion id, or None.
    """
    from django.utils import timezone

    due_fn = _service("brain.reflection", "deep_reflection_due")
    run_fn = _service("brain.reflection", "deep_reflection_run")
    if due_fn is None or run_fn is None:
        return None
    now = timezone.now()
    due, why = due_fn(now=now, mode=mode)
    if not due:
        return None
    log.info("deep_reflection_due", reason=why)
    outcome = run_fn(now=now, mode=mode)
    if outcome.candidate_version is None:
        return None
    from brain.models import PlaybookVersion

    candidate_id = PlaybookVersion.objects.filter(version=outcome.candidate_version).values_list("pk", flat=True).first()
    if candidate_id is not None:
        candidate_validation_request(candidate_id=candidate_id)
    return candidate_id


def candidate_validation_request(*, candidate_id: int) -> None:
    """Queue the replay validation of a candidate playbook (`tradebot.tasks.reflection_playbook_validate`)."""
    from tradebot.celery import app

    log.info("playbook_validation_requested", candidate_id=candidate_id)
    app.signature("tradebot.tasks.reflection_playbook_validate", args=(candidate_id,)).set(queue="reflection").apply_async()


def risk_day_reset(*, exchange: Any, now: Any = None) -> None:
    """00:00 UTC: execution records the day-start equity and ends a daily-loss HALT."""
    from django.utils import timezone

    from execution.selectors import account_state
    from execution.services import risk_daily_reset

    risk_daily_reset(now=now or timezone.now(), equity=account_state(exchange=exchange).equity)
