"""Versioned playbook: the current version, saving a new one, status changes.

Every version is validated against `brain.playbook_schema.Playbook` before it
is written. Versions are never edited in place by code: a change is a new
version.

What trades vs what is learned (issue 15): a playbook is split into its
trading content and its statistics (`playbook_split`: each strategy's
historical win rate and average R:R, the confidence calibration, the
reflection's count of how long a strategy has been off). Statistics measured
by a reflection are a `PlaybookObservation` of the version that traded, never
a new version; a new version is a change of trading content, and it starts as
a CANDIDATE. v1 (the seed) is the only version that starts active; after it a
version becomes active only by validation (`playbook_promote`, a
compare-and-swap on the version it was validated against) or by a person's
forced, journaled activation (`playbook_activate_forced`, needing a reason).

Versions learned inside a replay (`manage.py replay --learn`) carry that run's id (`run_id`): their
statuses are the run's own (the run's promotions go through the same compare-and-swap, on the run's
active version), and the live bot never reads them (`playbook_current` is the bot's own active version).
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import structlog
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from brain.models import PLAYBOOK_TRANSITIONS, PlaybookObservation, PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook_schema import Playbook, playbook_validate

log = structlog.get_logger(__name__)
VALIDATE_TASK = "tradebot.tasks.reflection_playbook_validate"
# Statistics fields of a strategy (and of its params): measured, not traded on.
STRATEGY_STATISTICS = ("historical_winrate", "avg_rr")
PARAM_STATISTICS = ("disabled_reflections",)
DEFAULT_FILE = Path(__file__).resolve().parent / "data" / "playbook_v1.json"


class PlaybookError(Exception):
    """A playbook version could not be saved or moved to another status."""


def playbook_default() -> dict:
    """The seed-shaped v1 playbook (validated)."""
    return playbook_validate(json.loads(DEFAULT_FILE.read_text())).model_dump(mode="json")


def playbook_current() -> PlaybookVersion:
    """The active version with the highest number; creates v1 when there is none."""
    current = PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE, run_id="").order_by("-version").first()
    if current is not None:
        return current
    try:
        with transaction.atomic():
            return playbook_save(data=playbook_default(), change_summary="Default playbook v1 (seed)", triggered_by=PlaybookTrigger.INIT,
                                 status=PlaybookStatus.ACTIVE)
    except IntegrityError:
        # Another process created v1 at the same moment: use theirs.
        return PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE, run_id="").order_by("-version").first()  # type: ignore[return-value]


def playbook_model(version: PlaybookVersion) -> Playbook:
    return playbook_validate(version.playbook)


def playbook_save(
    *,
    data: dict,
    change_summary: str,
    triggered_by: str,
    performance: dict | None = None,
    status: str = PlaybookStatus.CANDIDATE,
    validation: dict | None = None,
    changes: list[dict[str, Any]] | None = None,
    evidence: dict[str, Any] | None = None,
    run_id: str = "",
    parent: PlaybookVersion | None = None,
) -> PlaybookVersion:
    """Validate and store a new version (number = highest + 1).

    Only the seed (triggered_by init) is saved ACTIVE; everything else is a
    CANDIDATE that waits for validation (or a person's forced activation).
    `run_id`: a replay run's own version (replay --learn), whose parent is `parent` (the version
    that run trades); otherwise the parent is the bot's active version.
    """
    if triggered_by not in PlaybookTrigger.values:
        raise PlaybookError(f"triggered_by must be one of {PlaybookTrigger.values}, got {triggered_by!r}")
    if status not in (PlaybookStatus.ACTIVE, PlaybookStatus.CANDIDATE):
        raise PlaybookError(f"a new version is active or candidate, not {status!r}")
    if status == PlaybookStatus.ACTIVE and (triggered_by != PlaybookTrigger.INIT or run_id):
        # Every change is gated: a new version trades only after validation or a person's forced activation.
        raise PlaybookError("only the seed v1 starts active; a new version is a candidate (validated, or forced by a person)")
    try:
        clean = playbook_validate(data).model_dump(mode="json")
    except ValueError as exc:
        raise PlaybookError(f"invalid playbook: {exc}") from exc
    with transaction.atomic():
        previous = PlaybookVersion.objects.select_for_update().filter(status=PlaybookStatus.ACTIVE, run_id="").order_by("-version").first()
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
            parent_version=parent.version if parent is not None else (previous.version if previous else None),
            changes=changes,
            evidence=evidence,
            activated_at=timezone.now() if status == PlaybookStatus.ACTIVE else None,
            activated_by="seed" if status == PlaybookStatus.ACTIVE else "",
            run_id=run_id,
        )
    log.info("playbook_saved", version=number, status=status, triggered_by=triggered_by)
    return saved


def playbook_transition(*, version: PlaybookVersion, to: str, validation: dict | None = None) -> PlaybookVersion:
    """Move a version along PLAYBOOK_TRANSITIONS to a status other than ACTIVE (rejected, retired).

    ACTIVE is reached only through `playbook_promote` (validated) or `playbook_activate_forced` (a person).
    """
    if to not in PLAYBOOK_TRANSITIONS.get(version.status, frozenset()):
        raise PlaybookError(f"playbook v{version.version}: {version.status} -> {to} is not allowed")
    if to == PlaybookStatus.ACTIVE:
        raise PlaybookError("activation goes through playbook_promote (validated) or playbook_activate_forced (a person)")
    version.status = to
    if validation is not None:
        version.validation = validation
    version.save(update_fields=["status", "validation"])
    return version


def playbook_promote(*, candidate: PlaybookVersion, against: int, validation: dict) -> bool:
    """Compare-and-swap: activate `candidate` only if v`against` is still the active version.

    The conditional UPDATE on the active row is the swap: when a person (or another promotion)
    activated something else while the validation ran, it matches no row and nothing changes;
    the caller validates again against the new active version. A replay run's own candidate
    (`run_id`) swaps against that run's active version instead (`_promote_in_run`).
    """
    if candidate.run_id:
        return _promote_in_run(candidate=candidate, against=against, validation=validation)
    with transaction.atomic():
        swapped = PlaybookVersion.objects.filter(version=against, status=PlaybookStatus.ACTIVE).update(status=PlaybookStatus.RETIRED)
        if not swapped:
            return False
        won = PlaybookVersion.objects.filter(pk=candidate.pk, status=PlaybookStatus.CANDIDATE).update(
            status=PlaybookStatus.ACTIVE, validation=validation, validated_against=against, activated_at=timezone.now(),
            activated_by="validation", activation_reason=str(validation.get("reason", ""))[:2000])
        if not won:  # decided meanwhile (a redelivered task): leave everything as it was
            transaction.set_rollback(True)
            return False
    candidate.refresh_from_db()
    return True


def playbook_run_active(*, run_id: str) -> PlaybookVersion | None:
    """The version a replay run promoted last (None: the run still trades the version it started with)."""
    return PlaybookVersion.objects.filter(run_id=run_id, status=PlaybookStatus.ACTIVE).order_by("-version").first()


def _promote_in_run(*, candidate: PlaybookVersion, against: int, validation: dict) -> bool:
    """Compare-and-swap within a replay run: v`against` must still be what the run trades.

    The run trades its newest ACTIVE version of its own, else the version it started with (the
    bot's, never touched here). Nothing outside the run changes.
    """
    run_id = candidate.run_id
    with transaction.atomic():
        held = PlaybookVersion.objects.filter(run_id=run_id, status=PlaybookStatus.ACTIVE)
        if held.exists():
            if not held.filter(version=against).update(status=PlaybookStatus.RETIRED):
                return False
        elif PlaybookVersion.objects.filter(version=against, run_id=run_id).exists():
            return False  # against was the run's own and is no longer active
        won = PlaybookVersion.objects.filter(pk=candidate.pk, status=PlaybookStatus.CANDIDATE).update(
            status=PlaybookStatus.ACTIVE, validation=validation, validated_against=against, activated_at=timezone.now(),
            activated_by=f"validation (replay {run_id})"[:150], activation_reason=str(validation.get("reason", ""))[:2000])
        if not won:
            transaction.set_rollback(True)
            return False
    candidate.refresh_from_db()
    return True


def playbook_activate_forced(*, version: int, by: str, reason: str) -> PlaybookVersion:
    """A person activates a version without validation: needs a reason, records who, journaled."""
    from journal.services import event_record

    reason = (reason or "").strip()
    by = (by or "").strip()
    if not reason:
        raise PlaybookError("a forced activation needs a reason (--reason TEXT)")
    if not by:
        raise PlaybookError("a forced activation records who made it; no user given")
    with transaction.atomic():
        row = PlaybookVersion.objects.select_for_update().filter(version=version).first()
        if row is None:
            raise PlaybookError(f"playbook version {version} does not exist")
        if row.run_id:
            raise PlaybookError(f"playbook v{version} was learned inside replay {row.run_id}: copy it into a candidate of "
                                f"the bot's own (`playbook rollback {version}`), then validate or force that one")
        if row.status == PlaybookStatus.ACTIVE:
            raise PlaybookError(f"playbook v{version} is active already")
        live_active = PlaybookVersion.objects.filter(status=PlaybookStatus.ACTIVE, run_id="")
        previous = list(live_active.values_list("version", flat=True))
        live_active.update(status=PlaybookStatus.RETIRED)
        row.status, row.activated_at, row.activated_by, row.activation_reason = PlaybookStatus.ACTIVE, timezone.now(), by, reason
        row.save(update_fields=["status", "activated_at", "activated_by", "activation_reason"])
        event_record(kind="playbook_forced_activation", level="warning",
                     message=f"playbook v{version} activated WITHOUT validation by {by}: {reason}",
                     data={"version": version, "by": by, "reason": reason, "retired": previous})
    return row


def playbook_split(data: dict) -> tuple[dict, dict]:
    """(trading content, statistics) of a playbook dict; statistics fields are blanked in the first."""
    trading = copy.deepcopy(playbook_validate(data).model_dump(mode="json"))
    stats: dict[str, Any] = {"strategies": {}, "confidence_calibration": trading.pop("confidence_calibration", {})}
    trading["confidence_calibration"] = {}
    for name, strategy in trading["strategy_definitions"].items():
        stats["strategies"][name] = {k: strategy.get(k) for k in STRATEGY_STATISTICS}
        stats["strategies"][name].update({k: strategy["params"].get(k) for k in PARAM_STATISTICS})
        for k in STRATEGY_STATISTICS:
            strategy[k] = None
        strategy["params"]["disabled_reflections"] = 0
    return trading, stats


def playbook_merge(trading: dict, stats: dict) -> dict:
    """A playbook from trading content and statistics (`playbook_split` in reverse)."""
    data = copy.deepcopy(trading)
    data["confidence_calibration"] = copy.deepcopy(stats.get("confidence_calibration") or {})
    for name, strategy in data["strategy_definitions"].items():
        known = (stats.get("strategies") or {}).get(name) or {}
        for k in STRATEGY_STATISTICS:
            strategy[k] = known.get(k)
        strategy["params"]["disabled_reflections"] = int(known.get("disabled_reflections") or 0)
    return playbook_validate(data).model_dump(mode="json")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: value}  # lists (lessons, filters, hours) are one leaf


def playbook_trading_changes(old: dict, new: dict) -> list[dict[str, Any]]:
    """The trading fields that differ (statistics ignored): path, old, new, and who reads it."""
    a, b = _flatten(playbook_split(old)[0]), _flatten(playbook_split(new)[0])
    changes = []
    for path in sorted(set(a) | set(b)):
        if a.get(path) != b.get(path):
            changes.append({"path": path, "old": a.get(path), "new": b.get(path), "read_by": playbook_reader(path)})
    return changes


def playbook_reader(path: str) -> str:
    """Who trades on a field: "rules" (the rules brain's parameters, also in the model's prompt) or "model" (text)."""
    parts = path.split(".")
    if parts[0] in ("market_regime_rules", "time_filters") or (parts[0] == "strategy_definitions" and len(parts) > 2 and parts[2] == "params"):
        return "rules"
    return "model"


def playbook_observed(version: PlaybookVersion) -> dict:
    """The version's playbook with the newest statistics observed on it (what a reflection starts from)."""
    latest = version.observations.order_by("-created_at", "-id").first()
    if latest is None:
        return playbook_validate(version.playbook).model_dump(mode="json")
    return playbook_merge(playbook_split(version.playbook)[0], latest.statistics)


def playbook_observation_record(*, version: PlaybookVersion, statistics: dict, trade_ids: list[int],
                                reflection_log_id: int | None, mode: str = "live", run_id: str = "") -> PlaybookObservation:
    """Record a reflection's statistics against the version (once per reflection)."""
    row, _ = PlaybookObservation.objects.get_or_create(
        reflection_log_id=reflection_log_id,
        defaults={"version": version, "statistics": statistics, "trade_ids": list(trade_ids), "mode": mode, "run_id": run_id})
    return row


def playbook_candidate_propose(*, data: dict, triggered_by: str, change_summary: str, reasons: dict[str, str] | None = None,
                               evidence: dict[str, Any] | None = None, performance: dict | None = None,
                               queue_validation: bool = True) -> PlaybookVersion:
    """A change of trading content as a CANDIDATE (admin edit or add, rollback, search); validation is queued.

    Refused when its trading content equals the active version's (statistics do not make a version).
    Every changed field is listed with the reason given (or the change summary).
    """
    current = playbook_current()
    try:
        changes = playbook_trading_changes(current.playbook, data)
    except ValueError as exc:
        raise PlaybookError(f"invalid playbook: {exc}") from exc
    if not changes:
        raise PlaybookError(f"the trading content equals the active v{current.version}: there is no candidate to validate")
    reasons = reasons or {}
    ids = list((evidence or {}).get("trade_ids") or [])
    for c in changes:
        c["reason"] = reasons.get(c["path"], change_summary)
        c["evidence_trade_ids"] = ids
    saved = playbook_save(data=data, change_summary=change_summary, triggered_by=triggered_by, performance=performance,
                          status=PlaybookStatus.CANDIDATE, changes=changes, evidence=evidence)
    if queue_validation:
        validation_queue(candidate_id=saved.pk)
    return saved


def validation_queue(*, candidate_id: int) -> None:
    """Send the candidate's validation to the reflection queue once the transaction commits (task named, not imported)."""
    from celery import current_app

    def send() -> None:
        current_app.signature(VALIDATE_TASK, args=(candidate_id,)).set(queue="reflection").apply_async()

    transaction.on_commit(send)


def playbook_text(version: PlaybookVersion) -> list[str]:
    """A version's JSON, indented with sorted keys, so a diff shows only real changes."""
    return json.dumps(version.playbook, indent=2, sort_keys=True).splitlines()


def playbook_diff(a: PlaybookVersion, b: PlaybookVersion) -> list[str]:
    """Unified diff of two versions' JSON (the `playbook diff` command and the admin diff view)."""
    return list(difflib.unified_diff(playbook_text(a), playbook_text(b), fromfile=f"v{a.version}", tofile=f"v{b.version}", lineterm=""))
