"""Small writers every app uses to put a line in the journal."""
from __future__ import annotations

from typing import Any

from journal.models import EventLevel, JournalEvent, Mode
import structlog
from redaction import redact

log = structlog.get_logger(__name__)


def event_record(
    *,
    kind: str,
    message: str,
    level: str = EventLevel.INFO,
    data: dict[str, Any] | None = None,
    instrument_id: int | None = None,
    cycle_id: int | None = None,
    mode: str = Mode.LIVE,
) -> JournalEvent:
    """Write a journal event and the same line to the log (secrets redacted)."""
    message = redact(message)
    getattr(log, "warning" if level == EventLevel.WARNING else "error" if level in (EventLevel.ERROR, EventLevel.CRITICAL) else "info")(
        kind, message=message, cycle_id=cycle_id
    )
    return JournalEvent.objects.create(
        kind=kind, message=message, level=level, data=data or {}, instrument_id=instrument_id, cycle_id=cycle_id, mode=mode
    )
