"""The news calendar: scheduled macro releases the bot treats carefully.

Events live in `NewsEvent` (shipped from brain/data/news_calendar.json by a
data migration, editable in the admin). Around a release the screener is
bypassed and research is triggered (DESIGN.md).
"""
from __future__ import annotations

import bisect
import json
import threading
import time
from collections import OrderedDict
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

    For a replay (a past market; the calendar does not change under it). A live cycle
    reads the table once (`news_for_cycle`), so an edit in the admin counts from the next cycle.
    """
    rows = list(_events().filter(impact__in=("high", "medium")).order_by("scheduled_at", "id"))
    token = _PRELOADED.set(([row.scheduled_at for row in rows], rows))
    try:
        yield
    finally:
        _PRELOADED.reset(token)


# A live cycle asks "is there news at my as_of?" twice: SCREENING (the bypass rule) and RESEARCHING (the
# research trigger), in separate tasks, as a rule in the same `llm` worker process. Within `news_for_cycle`
# the answer is kept per (cycle, question) for a short while, so the second ask costs no read. Another
# cycle is another key and reads the table (an edit in the admin counts from the next cycle); the time
# bound keeps a reused id (a flushed test database) or a slow cycle from using an old answer.
_CYCLE: ContextVar[int | None] = ContextVar("news_cycle", default=None)
ANSWER_KEEP_SECONDS = 60.0
_ANSWERS_MAX = 256
_ANSWERS: OrderedDict[tuple[int, datetime, int, int], tuple[float, Any]] = OrderedDict()
_ANSWERS_LOCK = threading.Lock()  # a threads pool shares the dict


@contextmanager
def news_for_cycle(cycle_id: int | None) -> Iterator[None]:
    """Within the block, `news_event_near` shares its answers with the other stages of cycle `cycle_id`.

    None (a cycle not saved: the replay) keeps nothing.
    """
    token = _CYCLE.set(cycle_id)
    try:
        yield
    finally:
        _CYCLE.reset(token)


def news_answers_forget() -> None:
    """Drop the answers kept for cycles (tests; after an edit that must count within a cycle)."""
    with _ANSWERS_LOCK:
        _ANSWERS.clear()


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
    cycle_id = _CYCLE.get()
    key = None if cycle_id is None else (cycle_id, now, before, minutes_after)
    if key is not None:
        with _ANSWERS_LOCK:
            kept = _ANSWERS.get(key)
        if kept is not None and time.monotonic() - kept[0] <= ANSWER_KEEP_SECONDS:
            return kept[1]
    event = (
        _events()
        .filter(
            impact__in=("high", "medium"),
            scheduled_at__gte=now - timedelta(minutes=minutes_after),
            scheduled_at__lte=now + timedelta(minutes=before),
        )
        .order_by("scheduled_at")
        .first()
    )
    if key is not None:
        with _ANSWERS_LOCK:
            _ANSWERS[key] = (time.monotonic(), event)
            _ANSWERS.move_to_end(key)
            while len(_ANSWERS) > _ANSWERS_MAX:
                _ANSWERS.popitem(last=False)
    return event


def is_news_window(*, now: datetime, minutes_before: int = 30, minutes_after: int = 15) -> bool:
    return news_event_near(now=now, minutes_before=minutes_before, minutes_after=minutes_after) is not None


def upcoming_events(*, now: datetime, hours: int = 24) -> list[dict[str, str]]:
    """Events in the next `hours`, as short dicts for a prompt."""
    rows = _events().filter(scheduled_at__gte=now, scheduled_at__lte=now + timedelta(hours=hours))
    return [
        {"name": e.name, "kind": e.kind, "at_utc": e.scheduled_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"), "impact": e.impact}
        for e in rows
    ]
