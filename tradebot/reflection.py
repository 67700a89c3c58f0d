"""Glue between the close paths, the brain's reflection and execution's daily reset.

Post-trade reviews. Execution closes a journal Trade in one place
(`execution.sync.trade_close_record`, called by `account_sync`), but
several paths get there: the beat's account sync (SL/TP/liquidation), the
brain's own CLOSE order (EXECUTING: `order_place` syncs after a close), a
flatten (`bot halt --flatten`). Execution may not import this layer, so each
path's tradebot caller asks `trade_reviews_request` afterwards (the EXECUTING
task for the trades closed while it ran, through a task on the reflection
queue), and the beat's account sync also sweeps the trades closed in the last
REVIEW_SWEEP_HOURS, whatever closed them.

`trade_reviews_request` queues a review at most once per trade: under the
trade's row lock it records a `requested` post-trade ReflectionLog (the
claim), and sends `tradebot.tasks.reflection_trade_review` only after that
commits; a trade with a post-trade row (requested, running, done) is never
queued again. A `failed` row (the brain raised) is no review: the sweep queues
the trade again REVIEW_RETRY_AFTER after its last failure, up to
REVIEW_MAX_ATTEMPTS failures; after that only `manage.py reflect` (or a
direct request) tries it, so a broken brain is not asked every account sync.

`trade_review_request` (the task's body) runs the brain's review
(`brain.reflection.trade_review_run`, itself idempotent) and then drops the
request row; run twice, the second finds the review done and returns it. A
review that raised drops the request too (its failed row replaces it) and the
error goes on to the Celery task: the task is acked (acks_late acks a failure),
so it is not redelivered; the sweep's retry above is the retry.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from journal.models import Mode, ReflectionLog, ReflectionType, Trade, TradeStatus
from journal.services import event_record
from tradebot.logging import get_logger, redact

log = get_logger(__name__)
REVIEW_TASK = "tradebot.tasks.reflection_trade_review"
REQUESTED = "requested"  # a post-trade ReflectionLog that only says "a review is queued"
# How far back (wall time of the trade's last write, i.e. its close) a sweep looks for closed trades without a
# review. Bounds the sweep's read; a trade left unreviewed longer (the broker was down a whole day) is reviewed
# by `manage.py reflect` (every closed live trade without a finished review).
REVIEW_SWEEP_HOURS = 24
FAILED = "failed"  # brain.reflection.ReflectionStatus.FAILED: the review raised; not a review
# A failed review is queued again by the sweep after this wait (the account sync runs every few seconds: without
# it a brain that keeps failing would be asked, and billed, every sync) ...
REVIEW_RETRY_AFTER = timedelta(minutes=15)
# ... until it has failed this often; then it waits for `manage.py reflect` or a direct request.
REVIEW_MAX_ATTEMPTS = 3


def _service(module: str, name: str) -> Any | None:
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _post_trade_logs(trade_id: int):  # -> QuerySet[ReflectionLog]
    return ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, trade_ids=[trade_id])


def _failed_at(output: dict[str, Any] | None, created_at: datetime) -> datetime:
    """When a failed review failed (brain.reflection writes `failed_at`; else when it started)."""
    try:
        return datetime.fromisoformat(str((output or {})["failed_at"]))
    except (KeyError, ValueError):
        return created_at


def _retry_due(failed: list[datetime], now: datetime) -> bool:
    """Whether a trade whose only post-trade rows failed at `failed` may be queued again now."""
    return len(failed) < REVIEW_MAX_ATTEMPTS and now - max(failed) >= REVIEW_RETRY_AFTER


def trade_review_request(*, trade_id: int) -> int | None:
    """Review one closed trade (or record the request); returns the ReflectionLog id.

    Idempotent: a trade reviewed already gets its review back. A review left
    `running` by a worker that died is handed to `trade_review_run`, which
    takes it over once its lease is dead (a redelivered task must not give up
    on it).
    """
    trade = Trade.objects.filter(pk=trade_id).first()
    if trade is None:
        log.warning("trade_review_missing_trade", trade_id=trade_id)
        return None
    logs = _post_trade_logs(trade_id)
    done = logs.filter(status="done").order_by("id").first()
    if done is not None:
        # Reviewed already (a duplicate delivery, or `manage.py reflect` came first): drop a request left over.
        logs.filter(status=REQUESTED).delete()
        return done.pk
    review = _service("brain.reflection", "trade_review_run")
    if review is not None:
        try:
            result = review(trade_id=trade_id)
        finally:
            # The request placeholder: the review row (done, or failed and journaled) replaces it. A request
            # left behind would keep the sweep from ever queueing a failed review again.
            logs.filter(status=REQUESTED).delete()
        deep_reflection_if_due(mode=trade.mode)
        return getattr(result, "pk", None) or getattr(result, "id", None)
    requested = logs.filter(status=REQUESTED).order_by("id").first()
    if requested is not None:
        return requested.pk
    entry = ReflectionLog.objects.create(
        reflection_type=ReflectionType.POST_TRADE, mode=trade.mode, status=REQUESTED, trade_ids=[trade_id],
        input_prompt="", output_json={"requested_by": "account_sync", "reason": "post-trade review requested"},
    )
    event_record(kind="trade_review_requested", message=f"post-trade review requested for trade {trade_id}",
                 instrument_id=trade.instrument_id, mode=trade.mode)
    return entry.pk


def trade_reviews_due(*, trade_ids: Iterable[int] = (), sweep: bool = True, since: datetime | None = None,
                      mode: str = Mode.LIVE, run_id: str = "", now: datetime | None = None) -> list[int]:
    """Closed trades of (mode, run_id) with no post-trade review row yet, oldest first.

    `trade_ids`: trades a caller knows it has just closed. `sweep`: also every
    closed trade written (closed) since `since`, by default in the last
    REVIEW_SWEEP_HOURS, whatever closed it. A trade whose only rows are failed
    reviews is due again once its retry is (`_retry_due`). A hint only:
    `trade_reviews_request` checks again under the trade's lock.
    """
    now = now or timezone.now()
    ids = sorted({int(i) for i in trade_ids})
    if not ids and not sweep:
        return []
    which = Q(pk__in=ids)
    if sweep:
        which |= Q(updated_at__gte=since or now - timedelta(hours=REVIEW_SWEEP_HOURS))
    # A finished review sets self_review, so reviewed trades drop out here without looking at the logs.
    candidates = list(
        Trade.objects.filter(which, mode=mode, run_id=run_id, status=TradeStatus.CLOSED, pnl_usd__isnull=False,
                             self_review__isnull=True).order_by("id").values_list("pk", "updated_at")
    )
    if not candidates:
        return []
    # Post-trade rows are written after the close, which is the trade's last write: rows older than the oldest
    # candidate's write cannot be about these trades (one read instead of one per trade).
    oldest = min(updated for _, updated in candidates) - timedelta(minutes=1)
    logs = ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, created_at__gte=oldest)
    seen: set[int] = set()
    for row_ids in logs.exclude(status=FAILED).values_list("trade_ids", flat=True):
        seen.update(int(i) for i in (row_ids or []))
    failed: dict[int, list[datetime]] = {}
    for row_ids, output, created_at in logs.filter(status=FAILED).values_list("trade_ids", "output_json", "created_at"):
        for i in row_ids or []:
            failed.setdefault(int(i), []).append(_failed_at(output, created_at))
    return [pk for pk, _ in candidates if pk not in seen and (pk not in failed or _retry_due(failed[pk], now))]


def trade_reviews_request(*, trade_ids: Iterable[int] = (), sweep: bool = True, since: datetime | None = None,
                          mode: str = Mode.LIVE, run_id: str = "", requested_by: str = "",
                          now: datetime | None = None) -> list[int]:
    """Queue one post-trade review per closed trade that has none; returns the trade ids queued by this call.

    Which trades: `trade_ids`, plus with `sweep` those closed since `since` (default: the last
    REVIEW_SWEEP_HOURS), see `trade_reviews_due`.

    Each trade is claimed in its own short transaction: lock the Trade row,
    check that no post-trade ReflectionLog exists for it (failed reviews aside,
    once their retry is due), insert the
    `requested` row. The task is sent on commit (never from inside the
    transaction); if the broker refuses it, the request row is removed again
    so that a later sweep (the beat's account sync) queues it.
    """
    queued: list[int] = []
    now = now or timezone.now()
    due = trade_reviews_due(trade_ids=trade_ids, sweep=sweep, since=since, mode=mode, run_id=run_id, now=now)
    for trade_id in due:
        with transaction.atomic():
            # The row lock serialises claimers (and trade_review_run) on PostgreSQL; SQLite's IMMEDIATE
            # transactions already admit one writer at a time.
            locked = Trade.objects.select_for_update().filter(pk=trade_id, status=TradeStatus.CLOSED)
            if not list(locked.values_list("pk", flat=True)) or _review_blocked(trade_id, now):
                continue
            row = ReflectionLog.objects.create(
                reflection_type=ReflectionType.POST_TRADE, mode=mode, status=REQUESTED, trade_ids=[trade_id],
                input_prompt="", output_json={"requested_by": requested_by or "tradebot", "reason": "trade closed"},
            )
            transaction.on_commit(partial(_review_send, trade_id=trade_id, request_id=row.pk))
        queued.append(trade_id)
    if queued:
        log.info("trade_reviews_queued", trade_ids=queued, requested_by=requested_by)
    return queued


def _review_blocked(trade_id: int, now: datetime) -> bool:
    """Whether the trade's post-trade rows keep it from being queued (checked under the trade's lock)."""
    logs = _post_trade_logs(trade_id)
    if logs.exclude(status=FAILED).exists():
        return True  # requested, running or done: queued or reviewed already
    failed = [_failed_at(output, created_at) for output, created_at in logs.values_list("output_json", "created_at")]
    return bool(failed) and not _retry_due(failed, now)


def _review_send(*, trade_id: int, request_id: int) -> None:
    """Send the review task (after the claim committed); a refused send frees the claim for a later sweep."""
    from tradebot.celery import app

    try:
        app.signature(REVIEW_TASK, args=(trade_id,)).set(queue="reflection").apply_async()
    except Exception as exc:  # noqa: BLE001 - the close that led here has happened; never fail it over the review
        log.error("trade_review_not_queued", trade_id=trade_id, error=redact(str(exc)))
        ReflectionLog.objects.filter(pk=request_id, status=REQUESTED).delete()


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
    from execution.bot import risk_daily_reset

    risk_daily_reset(now=now or timezone.now(), equity=account_state(exchange=exchange).equity)
