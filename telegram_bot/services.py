"""Services of the Telegram layer: one alert pass, the on-demand reflection, the beat entry."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from journal.models import EventLevel, Mode
from journal.services import event_record
from telegram_bot.alerts import alerts_dispatch_due, alerts_scan
from telegram_bot.sender import deliveries_send
from tradebot.logging import get_logger

log = get_logger(__name__)
BEAT_NAME = "telegram alerts"


def alerts_dispatch_run(*, now: datetime | None = None) -> dict[str, Any]:
    """Scan the journal for new alerts, freeze the due ones, send what is due (each step commits on its own)."""
    now = now or timezone.now()
    created = alerts_scan(now=now)
    dispatched = alerts_dispatch_due(now=now)
    report = deliveries_send(now=now)
    result = {"new": created, "dispatched": len(dispatched), "sent": len(report.sent), "retry": len(report.retry),
              "failed": len(report.failed)}
    if any(result.values()):
        log.info("telegram_alerts", **result)
    return result


def reflection_run_now(*, requested_by: str) -> int | None:
    from brain.models import PlaybookVersion
    from brain.reflection import deep_reflection_run

    from tradebot.reflection import candidate_validation_request

    try:
        outcome = deep_reflection_run(now=timezone.now(), force=True, mode=Mode.LIVE)
    except Exception as exc:  # noqa: BLE001 - journaled (brain journals its own failures too)
        event_record(kind="telegram_reflect_failed", level=EventLevel.ERROR,
                     message=f"deep reflection requested by {requested_by} failed: {type(exc).__name__}: {exc}")
        return None
    if outcome.candidate_version is None:
        return None
    candidate_id = PlaybookVersion.objects.filter(version=outcome.candidate_version).values_list("pk", flat=True).first()
    if candidate_id is not None:
        candidate_validation_request(candidate_id=candidate_id)
    return candidate_id


def telegram_beat_sync(*, enabled: bool = True) -> Any:
    """The beat entry of the alert pass (on the `telegram` queue, expiring after one interval)."""
    import json

    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    every = settings.TELEGRAM_DISPATCH_SECONDS
    schedule, _ = IntervalSchedule.objects.get_or_create(every=every, period=IntervalSchedule.SECONDS)
    entry, _ = PeriodicTask.objects.update_or_create(name=BEAT_NAME, defaults={
        "task": "telegram_bot.tasks.alerts_dispatch", "queue": "telegram", "args": json.dumps([]), "interval": schedule,
        "crontab": None, "expire_seconds": every, "enabled": enabled,
        "description": f"Telegram alerts: new journal rows to the outbox, due messages sent (every {every}s)",
    })
    return entry
