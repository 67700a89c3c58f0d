"""Self-learning services: the post-trade review and the periodic deep reflection.

Post-trade review (`trade_review_run`): one closed trade -> the brain in use
(Claude through the gateway, or the rules brain) -> a `TradeReview` stored on
`Trade.self_review` and as a post_trade `ReflectionLog` (prompt, output). Its
`should_update_playbook` suggestion is passed to the next deep reflection.
A brain that raises finishes the row as FAILED (journaled, then re-raised);
FAILED is not a review, so the next request for the trade tries again.

Deep reflection (`deep_reflection_run`): every REFLECTION_INTERVAL_TRADES
closed trades or REFLECTION_INTERVAL_HOURS, whichever comes first, or on
demand. It summarises the trades not yet reflected on (`brain.performance`),
asks the brain for an updated playbook and stores it as a CANDIDATE version
(it trades only after `tradebot.learning` validates it in a replay).

No invented history: with no trades it says so (status no_trades); a NEW
lesson must list `evidence_trade_ids`, all of them closed trades in the
journal, or it is dropped (and the drop recorded); an invalid playbook or an
answer with no JSON leaves the current playbook in force (status invalid).

Restart safety: a deep reflection is claimed by a ReflectionLog row in state
`running` that holds the trade ids and a lease (owner host:pid, expiry). A
rerun after a crash finds the row, sees the lease is dead (the owner process
is gone or the lease expired) and resumes with the SAME trade ids; saving the
candidate and finishing the row happen in one transaction guarded by a
conditional UPDATE (`status=running`), so a candidate is never stored twice.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from brain.base import brain_for_settings
from brain.models import PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.performance import performance_summarize, summary_as_dict, trade_record_from_row
from brain.playbook import (playbook_current, playbook_observation_record, playbook_observed, playbook_save, playbook_split,
                            playbook_trading_changes)
from brain.playbook_schema import playbook_validate
from brain.prompts import DEEP_REFLECTION_SYSTEM, POST_TRADE_SYSTEM, deep_reflection_prompt, post_trade_prompt
from brain.schemas import DeepReflection, DeepReflectionAnswer, TradeReview, TradeView
from journal.models import EventLevel, Mode, ReflectionLog, ReflectionType, Trade, TradeStatus
from journal.services import event_record
import structlog
from redaction import redact

log = structlog.get_logger(__name__)


class ReflectionStatus:
    RUNNING = "running"
    DONE = "done"  # a candidate version was stored
    NO_CHANGE = "no_change"  # a valid answer that changes nothing
    NO_TRADES = "no_trades"  # nothing to reflect on; nothing changed
    INVALID = "invalid"  # the answer was unusable; the current playbook stays
    FAILED = "failed"  # the brain raised; the current playbook stays


TERMINAL = frozenset({ReflectionStatus.DONE, ReflectionStatus.NO_CHANGE, ReflectionStatus.NO_TRADES,
                      ReflectionStatus.INVALID, ReflectionStatus.FAILED})
# Allowed status changes of a reflection row; a terminal row never changes again.
TRANSITIONS: dict[str, frozenset[str]] = {ReflectionStatus.RUNNING: TERMINAL, **{s: frozenset() for s in TERMINAL}}


class ReflectionError(Exception):
    """A reflection was asked for something it cannot do (e.g. review an open trade)."""


@dataclass
class DeepReflectionOutcome:
    status: str  # not_due, busy, or a ReflectionStatus
    reason: str
    log_id: int | None = None
    trade_ids: list[int] = field(default_factory=list)
    old_version: int | None = None
    candidate_version: int | None = None
    dropped: list[dict[str, Any]] = field(default_factory=list)
    resumed: bool = False


# --- leases (who holds a running reflection) -----------------------------------


def _lease_seconds() -> float:
    # The reflection call with its retries, plus room for the rest.
    return max(600.0, settings.REFLECTION_TIMEOUT_SECONDS * 3)


def _new_lease() -> dict[str, Any]:
    until = timezone.now() + timedelta(seconds=_lease_seconds())
    return {"owner": f"{socket.gethostname()}:{os.getpid()}", "until": until.isoformat()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lease_alive(lease: dict[str, Any] | None) -> bool:
    """A lease holds while it has not expired and, on this host, its process still runs."""
    if not lease:
        return False
    try:
        until = datetime.fromisoformat(lease["until"])
        host, pid = str(lease["owner"]).rsplit(":", 1)
    except (KeyError, ValueError):
        return False
    if until <= timezone.now():
        return False
    if host == socket.gethostname() and int(pid) != os.getpid():
        return _pid_alive(int(pid))
    return True


# --- conversions -----------------------------------------------------------------


def trade_view_from_row(trade: Trade) -> TradeView:
    """A journal trade as the frozen view a brain may see."""
    return TradeView(
        id=trade.pk, inst_id=trade.instrument.inst_id, direction=trade.direction, status=trade.status,
        opened_at=trade.opened_at, closed_at=trade.closed_at, entry_price=trade.entry_price, exit_price=trade.exit_price,
        stop_loss=trade.stop_loss, take_profit=trade.take_profit, size_pct=trade.size_pct, leverage=trade.leverage,
        pnl_usd=trade.pnl_usd, pnl_pct=trade.pnl_pct, fees_usd=trade.fees_usd, strategy_used=trade.strategy_used,
        confidence_at_entry=trade.confidence_at_entry, market_regime=trade.market_regime, exit_reason=trade.exit_reason,
        reasoning=trade.reasoning[:2000], indicators_entry=trade.indicators_entry, indicators_exit=trade.indicators_exit,
        playbook_version=trade.playbook_version, research_context=trade.research_context,
    )


def _review_payload(log_row: ReflectionLog) -> TradeReview | None:
    try:
        return TradeReview.model_validate((log_row.output_json or {}).get("review"))
    except ValueError:
        return None


# --- post-trade review -------------------------------------------------------------


def trade_review_run(*, trade_id: int, brain_name: str | None = None) -> ReflectionLog:
    """Review one closed trade once; returns its post_trade ReflectionLog (done, or running elsewhere).

    When the brain raises, the row is finished as FAILED (error in output_json, a `trade_review_failed`
    journal event) and the exception goes on to the caller. A FAILED row does not count as a review: the
    next call starts a new one.
    """
    with transaction.atomic():
        trade = Trade.objects.select_for_update().select_related("instrument").filter(pk=trade_id).first()
        if trade is None:
            raise ReflectionError(f"trade {trade_id} does not exist")
        if trade.status != TradeStatus.CLOSED or trade.pnl_usd is None:
            raise ReflectionError(f"trade {trade_id} is not closed (status {trade.status}); only closed trades are reviewed")
        logs = ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, trade_ids=[trade_id])
        done = logs.filter(status=ReflectionStatus.DONE).order_by("id").first()
        if done is not None:
            return done  # idempotent: a reviewed trade is not reviewed twice
        running = logs.filter(status=ReflectionStatus.RUNNING).order_by("id").first()
        if running is not None and lease_alive((running.output_json or {}).get("lease")):
            return running  # another worker is reviewing it now
        if running is None:
            running = ReflectionLog.objects.create(
                reflection_type=ReflectionType.POST_TRADE, mode=trade.mode, status=ReflectionStatus.RUNNING,
                trade_ids=[trade_id], output_json={"lease": _new_lease()},
            )
        else:  # the previous reviewer died: take over
            running.output_json = {"lease": _new_lease()}
            running.save(update_fields=["output_json"])
    view = trade_view_from_row(trade)
    brain = brain_for_settings(brain_name)
    prompt = f"{POST_TRADE_SYSTEM}\n{post_trade_prompt(view)}"
    ReflectionLog.objects.filter(pk=running.pk).update(input_prompt=redact(prompt))
    try:
        # No transaction is open across the brain call (it may be an LLM call).
        # A replay's call is tied to the trade's cycle, so it counts in that run's budget on its virtual day
        # (brain.budget); a live one is on the wall clock either way and stays off the cycle's page.
        review = brain.review_trade(trade=view, mode=trade.mode,
                                    cycle_id=trade.cycle_id if trade.mode == Mode.REPLAY else None)
    except Exception as exc:
        # Left `running`, the row would block every retry until its lease expired and nobody would see why.
        _trade_review_failed(row=running, trade=trade, brain_name=brain.name, exc=exc)
        raise
    llm = getattr(brain, "last_result", None)
    output = {"review": review.model_dump(mode="json"), "brain": brain.name,
              "llm_status": getattr(llm, "status", None), "llm_call_ids": getattr(llm, "call_ids", [])}
    with transaction.atomic():
        finished = ReflectionLog.objects.filter(pk=running.pk, status=ReflectionStatus.RUNNING).update(
            status=ReflectionStatus.DONE, output_json=output)
        if finished:
            Trade.objects.filter(pk=trade_id).update(self_review={**review.model_dump(mode="json"), "brain": brain.name,
                                                                  "reflection_log_id": running.pk})
    if review.should_update_playbook:
        log.info("trade_review_suggests_playbook_change", trade_id=trade_id, suggestion=review.playbook_suggestion)
    running.refresh_from_db()
    return running


def _trade_review_failed(*, row: ReflectionLog, trade: Trade, brain_name: str, exc: Exception) -> None:
    """Finish a post-trade review whose brain raised as FAILED (journaled); a later request reviews the trade again."""
    error = redact(f"the {brain_name} brain failed: {type(exc).__name__}: {exc}")[:4000]
    now = timezone.now()
    # `failed_at`: when it failed (created_at is when it started); the review sweep waits from here before a retry.
    output = {"error": error, "brain": brain_name, "failed_at": now.isoformat()}
    with transaction.atomic():
        # Conditional like the success path: a reviewer that took over a dead lease and finished keeps its result.
        marked = ReflectionLog.objects.filter(pk=row.pk, status=ReflectionStatus.RUNNING).update(
            status=ReflectionStatus.FAILED, output_json=output)
        message = f"post-trade review of trade {trade.pk} failed (reflection log {row.pk}): {error}"
        if not marked:
            message += "; the review had already been finished elsewhere, that result stands"
        event_record(kind="trade_review_failed", message=message, level=EventLevel.ERROR, mode=trade.mode,
                     instrument_id=trade.instrument_id,
                     data={"trade_id": trade.pk, "reflection_log_id": row.pk, "brain": brain_name, "marked_failed": bool(marked)})


# --- deep reflection: what is due ----------------------------------------------------


def _closed_trades(mode: str, run_id: str = ""):  # -> QuerySet[Trade]
    # run_id "" = the bot's own trades; a replay run's id reflects on that run's trades only.
    return Trade.objects.filter(mode=mode, run_id=run_id, status=TradeStatus.CLOSED, pnl_usd__isnull=False)


def _consumed_trade_ids(mode: str) -> set[int]:
    ids: set[int] = set()
    for row in ReflectionLog.objects.filter(reflection_type=ReflectionType.PERIODIC, mode=mode).values_list("trade_ids", flat=True):
        ids.update(int(i) for i in (row or []))
    return ids


def trades_pending_reflection(*, mode: str = Mode.LIVE, run_id: str = "", until: datetime | None = None) -> list[int]:
    """Closed trades not yet in any deep reflection (finished or running), oldest first.

    `until`: only trades closed by then (a reflection inside a replay at virtual time t sees nothing later).
    """
    consumed = _consumed_trade_ids(mode)  # trade ids are unique across runs, so one set serves every run
    closed = _closed_trades(mode, run_id)
    if until is not None:
        closed = closed.filter(closed_at__lte=until)
    return [pk for pk in closed.order_by("closed_at", "id").values_list("pk", flat=True) if pk not in consumed]


def deep_reflection_due(*, now: datetime, mode: str = Mode.LIVE, run_id: str = "") -> tuple[bool, str]:
    """Every REFLECTION_INTERVAL_TRADES trades or REFLECTION_INTERVAL_HOURS hours, whichever first."""
    pending = trades_pending_reflection(mode=mode, run_id=run_id)
    if len(pending) >= settings.REFLECTION_INTERVAL_TRADES:
        return True, f"{len(pending)} closed trades since the last deep reflection (every {settings.REFLECTION_INTERVAL_TRADES})"
    last = ReflectionLog.objects.filter(reflection_type=ReflectionType.PERIODIC, mode=mode).order_by("-created_at", "-id").first()
    since = last.created_at if last is not None else None
    if since is None and pending:
        since = _closed_trades(mode, run_id).filter(pk=pending[0]).values_list("closed_at", flat=True).first()
    if since is None:
        return False, "no closed trades and no earlier reflection"
    hours = (now - since).total_seconds() / 3600
    if hours >= settings.REFLECTION_INTERVAL_HOURS:
        return True, f"{hours:.1f} h since the last deep reflection (every {settings.REFLECTION_INTERVAL_HOURS} h)"
    return False, f"{len(pending)} trades and {hours:.1f} h since the last deep reflection: not due"


def reflection_window(*, pending: list[int], version: int, mode: str = Mode.LIVE, run_id: str = "",
                      until: datetime | None = None) -> list[int]:
    """The trades a deep reflection judges, oldest first: those since the last reflection, and before them the latest
    earlier closed trades of the version it reflects on, REFLECTION_WINDOW_TRADES in all (closed by `until`).

    Without the earlier ones a reflection every REFLECTION_INTERVAL_HOURS sees the one or two trades of its last
    hours, too few for any verdict on a strategy; with them each reflection judges the version's recent record.
    No new trade, no window: a reflection with nothing new to see does not run (`deep_reflection_run`).
    """
    room = settings.REFLECTION_WINDOW_TRADES - len(pending)
    if not pending or room <= 0:
        return list(pending)
    earlier = _closed_trades(mode, run_id).filter(playbook_version=version).exclude(pk__in=pending)
    if until is not None:
        earlier = earlier.filter(closed_at__lte=until)
    first = _closed_trades(mode, run_id).filter(pk=pending[0]).values_list("closed_at", flat=True).first()
    if first is not None:
        earlier = earlier.filter(closed_at__lte=first)
    older = list(earlier.order_by("-closed_at", "-id").values_list("pk", flat=True)[:room])
    return [*reversed(older), *pending]


def _change_key(current: dict[str, Any], playbook: dict[str, Any]) -> frozenset[tuple[str, str]]:
    """What a change does to `current`: each changed trading field with its new value. The lessons a change carries
    (its explanation, citing the trades it saw) do not make it another change, unless lessons are all it changes."""
    changes = [(c["path"], json.dumps(c["new"], sort_keys=True, default=str))
               for c in playbook_trading_changes(current, playbook)]
    rules = frozenset(c for c in changes if not c[0].startswith("lessons_learned"))
    return rules or frozenset(changes)


def _proposed_before(*, candidate: dict[str, Any], current: PlaybookVersion, run_id: str, mode: str,
                     until: datetime | None) -> str | None:
    """Why this change is not proposed again, or None: the same trading content was already proposed against the
    version now in force (waiting for its validation, or rejected by it) and fewer than REFLECTION_WINDOW_TRADES
    trades of that version have closed since that proposal's evidence ended: the same evidence would give the same
    verdict, and a validation costs minutes of replay (and model calls with Claude)."""
    earlier = (PlaybookVersion.objects.filter(run_id=run_id)
               .filter(Q(status=PlaybookStatus.CANDIDATE)
                       | Q(status=PlaybookStatus.REJECTED, validated_against=current.version))
               .order_by("-version"))
    wanted = _change_key(current.playbook, candidate)
    for version in earlier:
        try:
            if _change_key(current.playbook, version.playbook) != wanted:
                continue
        except ValueError:
            continue
        since = (version.evidence or {}).get("to")
        new = _closed_trades(mode, run_id).filter(playbook_version=current.version)
        if since:
            new = new.filter(closed_at__gt=datetime.fromisoformat(since))
        if until is not None:
            new = new.filter(closed_at__lte=until)
        count = new.count()
        if count < settings.REFLECTION_WINDOW_TRADES:
            state = "rejected by validation" if version.status == PlaybookStatus.REJECTED else "waiting for validation"
            return (f"the same change to v{current.version} was proposed as v{version.version} ({state}); "
                    f"{count} of v{current.version}'s trades closed since its evidence, "
                    f"{settings.REFLECTION_WINDOW_TRADES} needed to propose it again")
    return None


# --- deep reflection: claim, run, finish ------------------------------------------------


def _claim(*, mode: str, run_id: str = "", base: PlaybookVersion | None = None,
           until: datetime | None = None) -> tuple[ReflectionLog | None, bool]:
    """(the running row we now hold, resumed?) or (None, False) when another process holds it."""
    current = base or playbook_current()
    with transaction.atomic():
        # Serialise claimers on the active playbook row (PostgreSQL row lock; SQLite has one writer).
        PlaybookVersion.objects.select_for_update().filter(pk=current.pk).first()
        rows = (ReflectionLog.objects.select_for_update()
                .filter(reflection_type=ReflectionType.PERIODIC, mode=mode, status=ReflectionStatus.RUNNING).order_by("id"))
        # A reflection over a replay run's trades is a separate job from the bot's own (run_id kept in output_json).
        running = next((r for r in rows if (r.output_json or {}).get("run_id", "") == run_id), None)
        if running is not None:
            if lease_alive((running.output_json or {}).get("lease")):
                return None, False
            running.output_json = {"lease": _new_lease(), "resumed_from": (running.output_json or {}).get("lease"), "run_id": run_id}
            running.save(update_fields=["output_json"])
            return running, True
        pending = trades_pending_reflection(mode=mode, run_id=run_id, until=until)
        row = ReflectionLog.objects.create(
            reflection_type=ReflectionType.PERIODIC, mode=mode, status=ReflectionStatus.RUNNING,
            trade_ids=reflection_window(pending=pending, version=current.version, mode=mode, run_id=run_id, until=until),
            old_version=current.version, output_json={"lease": _new_lease(), "run_id": run_id},
        )
        return row, False


def _finish(row: ReflectionLog, *, status: str, output: dict[str, Any], changes: dict[str, Any] | None = None,
            new_version: int | None = None) -> bool:
    """Move a running row to its end state; False when it was already finished by someone else."""
    if status not in TRANSITIONS[ReflectionStatus.RUNNING]:
        raise ReflectionError(f"reflection {row.pk}: running -> {status} is not allowed")
    # Keep whose trades these were (the claim's run id) in the final output too.
    output = {"run_id": (row.output_json or {}).get("run_id", ""), **output}
    return bool(ReflectionLog.objects.filter(pk=row.pk, status=ReflectionStatus.RUNNING).update(
        status=status, output_json=output, playbook_changes=changes, new_version=new_version))


def _performance_payload(trades: list[Trade]) -> dict[str, Any]:
    summary = summary_as_dict(performance_summarize([trade_record_from_row(t) for t in trades]))
    payload = {k: v for k, v in summary.items() if k not in ("by_strategy", "by_regime", "by_hour", "confidence_calibration")}
    payload["sharpe_note"] = "per trade, not annualised"
    payload["breakdown_by_strategy"] = summary["by_strategy"]
    payload["breakdown_by_regime"] = summary["by_regime"]
    payload["breakdown_by_time"] = {f"{int(h):02d}:00 UTC (opened)": v for h, v in summary["by_hour"].items()}
    payload["confidence_calibration"] = summary["confidence_calibration"]
    reviews, suggestions = [], []
    for t in trades:
        review = t.self_review or {}
        if "outcome" in review:
            reviews.append({"trade_id": t.pk, "outcome": review.get("outcome"), "lesson": review.get("lesson", ""),
                            "what_went_wrong": review.get("what_went_wrong", []), "should_update_playbook": review.get("should_update_playbook")})
            if review.get("should_update_playbook"):
                suggestions.append({"trade_id": t.pk, "suggestion": review.get("playbook_suggestion") or review.get("lesson", "")})
    payload["individual_trade_reviews"] = reviews
    payload["pending_playbook_suggestions"] = suggestions
    return payload


def _answer_problem(brain: Any) -> str | None:
    """Why the Claude brain's answer is unusable (no JSON, invalid playbook), from the gateway's result."""
    result = getattr(brain, "last_result", None)
    if result is None:
        return None  # the rules brain: no model answer to judge
    if result.value is None:
        return f"reflection answer {result.status}: {result.reason}"
    if isinstance(result.value, DeepReflectionAnswer):
        import json

        try:
            playbook_validate(json.loads(result.value.updated_playbook_json))
        except ValueError as exc:
            return f"the proposed playbook is invalid: {str(exc)[:800]}"
    return None


def _filter_lessons(candidate: dict[str, Any], current: dict[str, Any], *, mode: str,
                    run_id: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Drop new lessons that cite no trade or a trade that does not exist."""
    known_lessons = {(l.get("id"), l.get("lesson")) for l in current.get("lessons_learned", [])}
    new_ids = {int(i) for l in candidate.get("lessons_learned", []) for i in l.get("evidence_trade_ids", []) if str(i).lstrip("-").isdigit()}
    existing = set(_closed_trades(mode, run_id).filter(pk__in=new_ids).values_list("pk", flat=True)) if new_ids else set()
    kept, dropped = [], []
    for lesson in candidate.get("lessons_learned", []):
        if (lesson.get("id"), lesson.get("lesson")) in known_lessons:
            kept.append(lesson)
            continue
        cited = [int(i) for i in lesson.get("evidence_trade_ids", [])]
        missing = [i for i in cited if i not in existing]
        if not cited:
            dropped.append({"lesson": lesson, "reason": "cites no trade ids"})
        elif missing:
            dropped.append({"lesson": lesson, "reason": f"cites trades that do not exist: {missing}"})
        else:
            kept.append(lesson)
    return {**candidate, "lessons_learned": kept}, dropped


def _explain(changed: list[dict[str, Any]], reflection: DeepReflection, ids: list[int]) -> None:
    """Each changed trading field with the reflection's reason and the trades it cites (its own list, else all)."""
    said = {c.path: c for c in reflection.changes}
    for item in changed:
        # A reflection names a field (…params.enabled) or a parent of it (lessons_learned).
        match = said.get(item["path"]) or next((c for p, c in said.items() if item["path"].startswith(p + ".")), None)
        if match is None and item["path"] == "lessons_learned":
            item["reason"] = "lessons added: " + "; ".join(
                str(l.get("lesson", ""))[:200] for l in item["new"] or [] if l not in (item["old"] or []))
            item["evidence_trade_ids"] = sorted({int(i) for l in item["new"] or [] if l not in (item["old"] or [])
                                                 for i in l.get("evidence_trade_ids", [])})
            continue
        item["reason"] = match.reason if match is not None else (reflection.summary or "deep reflection")
        item["evidence_trade_ids"] = list(match.evidence_trade_ids) if match is not None and match.evidence_trade_ids else list(ids)


def _evidence(trades: list[Trade]) -> dict[str, Any]:
    """The window the reflection learned from: its trades' span; validation folds must not overlap it."""
    opened = [t.opened_at for t in trades if t.opened_at]
    closed = [t.closed_at or t.opened_at for t in trades]
    return {"from": min(opened).isoformat() if opened else None, "to": max(closed).isoformat() if closed else None,
            "trade_ids": [t.pk for t in trades], "inst_ids": sorted({t.instrument.inst_id for t in trades})}


def _change_summary(reflection: DeepReflection, dropped: list[dict[str, Any]]) -> str:
    lines = [reflection.summary or "deep reflection"]
    for c in reflection.changes:
        lines.append(f"- {c.path}: {c.old} -> {c.new} ({c.reason}; evidence trades {c.evidence_trade_ids})")
    for d in dropped:
        lines.append(f"- dropped lesson {d['lesson'].get('id')!r}: {d['reason']}")
    return "\n".join(lines)


def deep_reflection_run(*, now: datetime | None = None, force: bool = False, mode: str = Mode.LIVE,
                        brain_name: str | None = None, run_id: str = "", base: PlaybookVersion | None = None,
                        until: datetime | None = None, owner_run_id: str = "") -> DeepReflectionOutcome:
    """Reflect on the trades since the last deep reflection; store the result as a CANDIDATE playbook.

    `mode`/`run_id` choose whose trades: the bot's own (live, "") by default, or
    one replay run's (mode replay, its run id), e.g. to learn from a backtest.
    Inside a replay (`tradebot.replay_learn`): `base` is the version the run trades (default: the
    bot's active one), `until` the virtual time (only trades closed by then are read) and
    `owner_run_id` makes the candidate that run's own version (never one the live bot reads).
    """
    now = now or timezone.now()
    if not force:
        due, why = deep_reflection_due(now=now, mode=mode, run_id=run_id)
        if not due:
            return DeepReflectionOutcome(status="not_due", reason=why)
    row, resumed = _claim(mode=mode, run_id=run_id, base=base, until=until)
    if row is None:
        return DeepReflectionOutcome(status="busy", reason="another deep reflection is running (its lease is alive)")
    ids = [int(i) for i in row.trade_ids]
    outcome = DeepReflectionOutcome(status=ReflectionStatus.RUNNING, reason="", log_id=row.pk, trade_ids=ids,
                                    old_version=row.old_version, resumed=resumed)
    trades = list(_closed_trades(mode, run_id).filter(pk__in=ids).select_related("instrument").order_by("closed_at", "id"))
    if not trades:
        reason = "no closed trades since the last deep reflection: nothing to learn from, the playbook is unchanged"
        _finish(row, status=ReflectionStatus.NO_TRADES, output={"message": reason})
        event_record(kind="reflection_no_trades", message=reason, mode=mode)
        outcome.status, outcome.reason = ReflectionStatus.NO_TRADES, reason
        return outcome

    current = PlaybookVersion.objects.filter(version=row.old_version).first() or base or playbook_current()
    # The reflection starts from the version plus the statistics observed on it since (they are not versions).
    observed = playbook_observed(current)
    views = [trade_view_from_row(t) for t in trades]
    performance = _performance_payload(trades)
    prompt = deep_reflection_prompt(trades=views, playbook=observed, version=current.version, performance=performance)
    ReflectionLog.objects.filter(pk=row.pk).update(input_prompt=redact(f"{DEEP_REFLECTION_SYSTEM}\n{prompt}"))
    brain = brain_for_settings(brain_name, playbook=current.playbook, playbook_version=current.version)
    try:
        # No transaction is open across the brain call (it may be a 20 s LLM call).
        reflection = brain.reflect(trades=views, playbook=observed, version=current.version,
                                   performance=performance, mode=mode,
                                   # a replay's: on the run's budget, the virtual day of its latest trade
                                   cycle_id=trades[-1].cycle_id if mode == Mode.REPLAY else None)
    except Exception as exc:  # noqa: BLE001 - a failed reflection must leave the playbook in force, recorded
        reason = redact(f"the {brain.name} brain failed: {type(exc).__name__}: {exc}")
        _finish(row, status=ReflectionStatus.FAILED, output={"error": reason, "brain": brain.name})
        event_record(kind="reflection_failed", message=reason, level="error", mode=mode)
        outcome.status, outcome.reason = ReflectionStatus.FAILED, reason
        return outcome

    output = {"brain": brain.name, "run_id": run_id, "reflection": reflection.model_dump(mode="json"),
              "performance": {k: v for k, v in performance.items() if not k.startswith("breakdown")}}
    llm = getattr(brain, "last_result", None)
    if llm is not None:
        output["llm_status"], output["llm_call_ids"] = llm.status, llm.call_ids
    problem = _answer_problem(brain)
    candidate: dict[str, Any] | None = None
    if problem is None:
        try:
            candidate = playbook_validate(reflection.updated_playbook).model_dump(mode="json")
        except ValueError as exc:
            problem = f"the proposed playbook is invalid: {str(exc)[:800]}"
    if problem is not None or candidate is None:
        reason = f"current playbook v{current.version} stays in force: {problem}"
        _finish(row, status=ReflectionStatus.INVALID, output={**output, "error": problem})
        event_record(kind="reflection_invalid", message=reason, level="warning", mode=mode)
        outcome.status, outcome.reason = ReflectionStatus.INVALID, reason
        return outcome

    candidate, dropped = _filter_lessons(candidate, current.playbook, mode=mode, run_id=run_id)
    for d in dropped:
        log.warning("reflection_lesson_dropped", lesson_id=d["lesson"].get("id"), reason=d["reason"], log_id=row.pk)
    outcome.dropped = dropped
    changes = {"changes": [c.model_dump(mode="json") for c in reflection.changes], "dropped_lessons": dropped}
    # Statistics (win rate, R:R, calibration) are observations of the version that traded, not a new version.
    trading, statistics = playbook_split(candidate)
    observation = playbook_observation_record(version=current, statistics=statistics, trade_ids=ids, reflection_log_id=row.pk,
                                              mode=mode, run_id=run_id)
    output["observation_id"] = observation.pk
    changed = playbook_trading_changes(current.playbook, candidate)
    if not changed:
        reason = (f"no change to the trading content of playbook v{current.version} (statistics recorded as observation "
                  f"{observation.pk}): {reflection.summary}")
        _finish(row, status=ReflectionStatus.NO_CHANGE, output=output, changes=changes)
        outcome.status, outcome.reason = ReflectionStatus.NO_CHANGE, reason
        return outcome
    repeated = _proposed_before(candidate=candidate, current=current, run_id=owner_run_id, mode=mode, until=until)
    if repeated is not None:
        reason = f"playbook v{current.version} stays in force: {repeated}"
        _finish(row, status=ReflectionStatus.NO_CHANGE, output={**output, "repeated": repeated}, changes=changes)
        event_record(kind="reflection_repeated", message=reason, mode=mode)
        outcome.status, outcome.reason = ReflectionStatus.NO_CHANGE, reason
        return outcome
    _explain(changed, reflection, ids)
    evidence = _evidence(trades)

    headline = {k: performance[k] for k in ("total_trades", "win_rate", "profit_factor", "sharpe_ratio", "total_pnl", "max_drawdown_usd")}
    with transaction.atomic():
        saved = playbook_save(data=candidate, change_summary=_change_summary(reflection, dropped), triggered_by=PlaybookTrigger.REFLECTION,
                              performance={**headline, "trade_ids": ids, "reflection_log_id": row.pk}, status=PlaybookStatus.CANDIDATE,
                              changes=changed, evidence=evidence, run_id=owner_run_id,
                              parent=current if owner_run_id else None)
        if not _finish(row, status=ReflectionStatus.DONE, output=output, changes=changes, new_version=saved.version):
            # Someone else finished this reflection meanwhile: undo our candidate (never applied twice).
            transaction.set_rollback(True)
            return DeepReflectionOutcome(status="busy", reason="the reflection was finished by another process", log_id=row.pk, trade_ids=ids)
    event_record(kind="playbook_candidate", mode=mode, data={"version": saved.version, "log_id": row.pk},
                 message=f"deep reflection on {len(ids)} trades proposed playbook v{saved.version} (candidate; replay validation next)")
    outcome.status, outcome.candidate_version = ReflectionStatus.DONE, saved.version
    outcome.reason = reflection.summary
    return outcome
