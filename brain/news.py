"""The news calendar: scheduled macro releases the bot treats carefully.

Events live in `NewsEvent` (shipped from brain/data/news_calendar.json by a
data migration, editable in the admin). Around a release the screener is
bypassed and research is triggered (DESIGN.md).
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings

CALENDAR_FILE = Path(__file__).resolve().parent / "data" / "news_calendar.json"
UTC = ZoneInfo("UTC")


def calendar_rows(path: Path = CALENDAR_FILE) -> list[dict[str, Any]]:
    """The shipped events with UTC times (pure: used by the data migration)."""
    doc = json.loads(path.read_text())
    tz = ZoneInfo(doc["timezone"])
    rows = []
    for event in doc["events"]:
        local = datetime.fromisoformat(event["local"]).replace(tzinfo=tz)
        rows.append(
            {
                "kind": event["kind"],
                "name": event["name"],
                "scheduled_at": local.astimezone(UTC),
                "impact": event.get("impact", "high"),
                "confidence": event.get("confidence", "high"),
                "source": event.get("source", "")[:300],
            }
        )
    return rows


def _events():
    from brain.models import NewsEvent

    return NewsEvent.objects.filter(enabled=True)


# A replay asks "is there news now?" every cycle: it reads the calendar once (see `calendar_preloaded`).
_PRELOADED: ContextVar[tuple[list[datetime], list[Any]] | None] = ContextVar("news_calendar_preloaded", default=None)


@contextmanager
def calendar_preloaded() -> Iterator[None]:
    """Within the block, `news_event_near` answers from the enabled high/medium events read once.

    For a replay (a past market; the calendar does not change under it). Live cycles
    read the table each time, so an edit in the admin counts at once.
    """
    rows = list(_events().filter(impact__in=("high", "medium")).order_by("scheduled_at", "id"))
    token = _PRELOADED.set(([row.scheduled_at for row in rows], rows))
    try:
        yield
    finally:
        _PRELOADED.reset(token)


def news_event_near(*, now: datetime, minutes_before: int | None = None, minutes_after: int = 15):
    """The enabled high/medium event whose window contains `now`, or None.

    The window opens `minutes_before` a release and stays open a little after
    it, when the market reacts.
    """
    before = settings.NEWS_WINDOW_MINUTES if minutes_before is None else minutes_before
    preloaded = _PRELOADED.get()
    if preloaded is not None:
        times, rows = preloaded
        i = bisect.bisect_left(times, now - timedelta(minutes=minutes_after))
        return rows[i] if i < len(rows) and times[i] <= now + timedelta(minutes=before) else None
    return (
        _events()
        .filter(
            impact__in=("high", "medium"),
            scheduled_at__gte=now - timedelta(minutes=minutes_after),
            scheduled_at__lte=now + timedelta(minutes=before),
        )
        .order_by("scheduled_at")
        .first()
    )


def is_news_window(*, now: datetime, minutes_before: int = 30, minutes_after: int = 15) -> bool:
    return news_event_near(now=now, minutes_before=minutes_before, minutes_after=minutes_after) is not None


def upcoming_events(*, now: datetime, hours: int = 24) -> list[dict[str, str]]:
    """Events in the next `hours`, as short dicts for a prompt."""
    rows = _events().filter(scheduled_at__gte=now, scheduled_at__lte=now + timedelta(hours=hours))
    return [
        {"name": e.name, "kind": e.kind, "at_utc": e.scheduled_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"), "impact": e.impact}
        for e in rows
    ]
