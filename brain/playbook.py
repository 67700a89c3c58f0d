"""Versioned playbook: the current version, saving a new one, status changes.

Every version is validated against `brain.playbook_schema.Playbook` before it
is written. Versions are never edited in place by code: a change is a new
version (the admin may fix a version's JSON; its form validates too).
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path

from django.db import IntegrityError, transaction
from django.db.models import Max

from brain.models import PLAYBOOK_TRANSITIONS, PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook_schema import Playbook, playbook_validate
import structlog

log = structlog.get_logger(__name__)
DEFAULT_FILE = Path(__file__).resolve().parent / "data" / "playbook_v1.json"


class PlaybookError(Exception):
    """A playbook version could not be saved or moved to another status."""


def playbook_default() -> dict:
    """The seed-shaped v1 playbook (validated)."""
    return playbook_validate(json.loads(DEFAULT_FILE.read_text())).model_dump(mode="json")


def playbook_current() -> PlaybookVersion:
    """The active version with the highest number; creates v1 when there is none."""
    current = PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE).order_by("-version").first()
    if current is not None:
        return current
    try:
        with transaction.atomic():
            return playbook_save(data=playbook_default(), change_summary="Default playbook v1 (seed)", triggered_by=PlaybookTrigger.INIT)
    except IntegrityError:
        # Another process created v1 at the same moment: use theirs.
        return PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE).order_by("-version").first()  # type: ignore[return-value]


def playbook_model(version: PlaybookVersion) -> Playbook:
    return playbook_validate(version.playbook)


def playbook_save(
    *,
    data: dict,
    change_summary: str,
    triggered_by: str,
    performance: dict | None = None,
    status: str = PlaybookStatus.ACTIVE,
    validation: dict | None = None,
) -> PlaybookVersion:
    """Validate and store a new version (number = highest + 1).

    Saving an ACTIVE version retires the previous active one; a CANDIDATE waits
    for `playbook_transition` after validation.
    """
    if triggered_by not in PlaybookTrigger.values:
        raise PlaybookError(f"triggered_by must be one of {PlaybookTrigger.values}, got {triggered_by!r}")
    if status not in (PlaybookStatus.ACTIVE, PlaybookStatus.CANDIDATE):
        raise PlaybookError(f"a new version is active or candidate, not {status!r}")
    try:
        clean = playbook_validate(data).model_dump(mode="json")
    except ValueError as exc:
        raise PlaybookError(f"invalid playbook: {exc}") from exc
    with transaction.atomic():
        previous = PlaybookVersion.objects.select_for_update().filter(status=PlaybookStatus.ACTIVE).order_by("-version").first()
        number = (PlaybookVersion.objects.aggregate(m=Max("version"))["m"] or 0) + 1
        if status == PlaybookStatus.ACTIVE and previous is not None:
            previous.status = PlaybookStatus.RETIRED
            previous.save(update_fields=["status"])
        saved = PlaybookVersion.objects.create(
            version=number,
            playbook=clean,
            change_summary=change_summary,
            triggered_by=triggered_by,
            performance_at_update=performance,
            status=status,
            validation=validation,
            parent_version=previous.version if previous else None,
        )
    log.info("playbook_saved", version=number, status=status, triggered_by=triggered_by)
    return saved


def playbook_transition(*, version: PlaybookVersion, to: str, validation: dict | None = None) -> PlaybookVersion:
    """Move a version along PLAYBOOK_TRANSITIONS; activating retires the current active one."""
    if to not in PLAYBOOK_TRANSITIONS.get(version.status, frozenset()):
        raise PlaybookError(f"playbook v{version.version}: {version.status} -> {to} is not allowed")
    with transaction.atomic():
        if to == PlaybookStatus.ACTIVE:
            PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE).exclude(pk=version.pk).update(status=PlaybookStatus.RETIRED)
        version.status = to
        if validation is not None:
            version.validation = validation
        version.save(update_fields=["status", "validation"])
    return version


def playbook_text(version: PlaybookVersion) -> list[str]:
    """A version's JSON, indented with sorted keys, so a diff shows only real changes."""
    return json.dumps(version.playbook, indent=2, sort_keys=True).splitlines()


def playbook_diff(a: PlaybookVersion, b: PlaybookVersion) -> list[str]:
    """Unified diff of two versions' JSON (the `playbook diff` command and the admin diff view)."""
    return list(difflib.unified_diff(playbook_text(a), playbook_text(b), fromfile=f"v{a.version}", tofile=f"v{b.version}", lineterm=""))
