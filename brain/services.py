"""The brain's services, as the pipeline calls them (see the contract in the notes).

None of them raises for model, network or data trouble: screening without a
verdict is "no signal", a decision without a valid answer is HOLD, research
that cannot run is skipped, and the reason is recorded each time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from django.conf import settings
from django.db.models import BooleanField, Case, Q, Value, When

from brain.base import Brain, brain_for_settings, brain_name_for_settings
from brain.budget import budget_check
from brain.news import news_event_near
from brain.schemas import (
    OPENING_ACTIONS, BrainContext, Decision, PositionCheck, PositionView, ResearchResult, ScreenResult,
)
from brain.watch import ReviewMark, position_review_due, review_mark_checked
from journal.bulk import row_new
from journal.models import EventLevel, ScreenerLog
from journal.services import event_record
from market.models import Instrument
from market.schemas import MarketSnapshot
import structlog
from redaction import redact

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ScreeningOutcome:
    proceed: bool
    bypassed: bool
    reason: str
    screen: ScreenResult | None
    screener_log_id: int | None
    # With `defer_log`: the ScreenerLog row, built but not saved (the replay bulk-inserts its rows).
    pending_log: ScreenerLog | None = None
    # The position watch's routine check, when one was asked: its answer as JSON (kept on the cycle) and, when it
    # said no, the review mark with the check counted (a replay keeps it in memory; live reads the cycles back).
    position_check: dict | None = None
    review_mark: ReviewMark | None = None


def _wall_now() -> datetime:
    return datetime.now(timezone.utc)


def brain_in_use(*, name: str | None = None, now: datetime | None = None, reuse: Brain | None = None,
                 check_budget: bool = True) -> Brain | None:
    """The brain for this call: the configured one, or the degrade-mode fallback.

    Returns None when degrade mode is HOLD. The live budget is checked on the wall
    clock on every call, `reuse` or not.
    `reuse`: a brain an earlier stage of the same cycle got here; returned when
    it is still the kind of brain to use, so the cycle's stages share one
    playbook version and the active playbook is read once per cycle, not once
    per stage (building a brain reads it).
    `check_budget=False` (a replay): the run's budget is its own, on its virtual days, and
    the gateway checks it on every call (brain.llm), so the live day's spending says nothing.
    """
    chosen = brain_name_for_settings(name)
    if chosen == "claude" and check_budget and budget_check(now=now or _wall_now()).degraded:
        if settings.LLM_DEGRADE_MODE == "hold":
            return None
        chosen = "rules"
    if reuse is not None and getattr(reuse, "name", None) == chosen:
        return reuse
    return brain_for_settings(chosen)


def screener_bypass_reason(*, snapshot: MarketSnapshot, context: BrainContext) -> str:
    """Why the screener is skipped and the analyst asked directly ("" = not bypassed)."""
    if context.manual_trigger:
        return "manual trigger"
    if settings.SCREENER_BYPASS_ON_POSITION and context.positions_for(snapshot.inst_id):
        return f"open position on {snapshot.inst_id}"
    if settings.SCREENER_BYPASS_ON_NEWS:
        event = news_event_near(now=context.now)
        if event is not None:
            return f"news window: {event.name} at {event.scheduled_at:%Y-%m-%d %H:%M} UTC"
    move = snapshot.price_change_1h_pct
    if snapshot.anomalies.move_1h or (move is not None and abs(move) > float(settings.ANOMALY_MOVE_1H_PCT)):
        return f"1H move {move * 100:+.2f}%" if move is not None else "1H move anomaly"
    funding = snapshot.funding_rate
    if snapshot.anomalies.funding_spike or (
        funding is not None and (funding > settings.FUNDING_SPIKE_HIGH or funding < settings.FUNDING_SPIKE_LOW)
    ):
        return f"funding spike {funding}"
    if not settings.SCREENER_ENABLED:
        return "screener disabled (SCREENER_ENABLED=false)"
    return ""


def _instrument(inst_id: str) -> Instrument | None:
    return Instrument.objects.filter(inst_id=inst_id).first()


def screening_run(*, snapshot: MarketSnapshot, context: BrainContext, cycle_id: int | None = None, mode: str = "live",
                  brain: Brain | None = None, instrument: Instrument | None = None,
                  defer_log: bool = False, watch: bool = False, last_review: ReviewMark | None = None) -> ScreeningOutcome:
    """Bypass rules or the screener; always one ScreenerLog row (when the instrument is known).

    `instrument` saves the lookup when the caller has the row. `defer_log=True` (replay) returns
    the row unsaved in `pending_log`, without its snapshot JSON: the caller saves it (in bulk)
    and decides how much of the snapshot to keep.
    `watch=True` (the LLM brain with POSITION_WATCH_ENABLED): with a position open the analyst is
    asked only when the position watch (brain.watch) has a trigger since `last_review`, or when its
    routine review's position check (`position_check_run`) says wake; otherwise the review is skipped,
    journaled on the ScreenerLog row with its reason.
    """
    instrument = instrument if instrument is not None and instrument.inst_id == snapshot.inst_id else _instrument(snapshot.inst_id)
    watch_skip = ""
    open_positions = context.positions_for(snapshot.inst_id)
    check: dict | None = None
    mark: ReviewMark | None = None
    log_bypass = ""
    screen: ScreenResult | None = None
    tokens = latency = 0
    cost, model = Decimal(0), ""
    if watch and open_positions and not context.manual_trigger:
        verdict = position_review_due(snapshot=snapshot, position=open_positions[0], last=last_review, now=context.now)
        bypass = f"position watch: {verdict.reason}" if verdict.action == "analyst" else ""
        watch_skip = verdict.reason if verdict.action == "skip" else ""
        log_bypass = "position watch"
        if verdict.action == "check" and last_review is not None:
            answer, check, (tokens, cost, model, latency) = position_check_run(
                snapshot=snapshot, position=open_positions[0], last=last_review, now=context.now, brain=brain,
                cycle_id=cycle_id, mode=mode)
            log_bypass = "position check"
            if answer.wake:
                bypass = f"position check: wake: {answer.reason}"
            else:
                watch_skip = f"position check: no: {answer.reason}"
                mark = review_mark_checked(last_review, at=context.now)
    else:
        bypass = screener_bypass_reason(snapshot=snapshot, context=context)
    if watch_skip:
        # The position is protected by its exchange-side SL/TP: neither the screener nor the analyst is asked.
        proceed, reason = False, watch_skip
    elif bypass:
        proceed, reason = True, f"bypassed: {bypass}"
    else:
        try:
            brain = brain or brain_in_use()
            if brain is None:
                screen = ScreenResult(signal=False, reason="LLM budget exhausted: degrade mode HOLD")
            else:
                t0 = time.monotonic()
                screen = brain.screen(snapshot=snapshot, context=context, cycle_id=cycle_id, mode=mode)
                latency = int((time.monotonic() - t0) * 1000)
                usage = getattr(brain, "last_result", None)
                if usage is not None:
                    tokens, cost, model, latency = usage.tokens, usage.cost_usd, usage.model, usage.latency_ms or latency
                else:
                    model = getattr(brain, "name", "")
        except Exception as exc:  # the screener must never break the cycle
            log.exception("screening_failed", inst_id=snapshot.inst_id)
            screen = ScreenResult(signal=False, reason=redact(f"screening failed: {type(exc).__name__}: {exc}")[:2000])
        proceed, reason = screen.signal, screen.reason
    log_id = None
    pending = None
    if instrument is not None:
        fields = dict(
            instrument=instrument, cycle_id=cycle_id, mode=mode, signal=proceed if bypass else bool(screen and screen.signal),
            bypassed=bool(bypass or watch_skip),
            bypass_reason=(log_bypass if check is not None else bypass or (log_bypass if watch_skip else ""))[:200],
            reason=reason,
            snapshot_json=None if defer_log else snapshot.as_jsonable(),
            model=model[:60], tokens_used=tokens, latency_ms=latency, cost_usd=cost,
        )
        # A deferred row goes to journal.bulk.rows_insert: built without Model.__init__'s overhead.
        row = row_new(ScreenerLog, **fields) if defer_log else ScreenerLog(**fields)
        if defer_log:
            pending = row
        else:
            row.save()
            log_id = row.pk
    else:
        log.warning("screener_log_without_instrument", inst_id=snapshot.inst_id)
    return ScreeningOutcome(proceed=proceed, bypassed=bool(bypass or watch_skip), reason=reason, screen=screen,
                            screener_log_id=log_id, pending_log=pending, position_check=check, review_mark=mark)


def position_check_run(*, snapshot: MarketSnapshot, position: PositionView, last: ReviewMark, now: datetime,
                       brain: Brain | None, cycle_id: int | None, mode: str,
                       ) -> tuple[PositionCheck, dict, tuple[int, Decimal, str, int]]:
    """The position watch's routine check on the screener model: (answer, its JSON, (tokens, cost, model, latency ms)).

    Never raises: a check that cannot be asked or answered (no brain that checks, budget, timeout, invalid answer,
    an exception) wakes the analyst, the safe side.
    """
    tokens = latency = 0
    cost, model, status = Decimal(0), "", "ok"
    try:
        brain = brain or brain_in_use()
        checker = getattr(brain, "check_position", None)
        if checker is None:
            answer, status = PositionCheck(wake=True, reason="no position check on this brain"), "skipped"
        else:
            t0 = time.monotonic()
            answer = checker(snapshot=snapshot, position=position, last=last, now=now, cycle_id=cycle_id, mode=mode)
            latency = int((time.monotonic() - t0) * 1000)
            usage = getattr(brain, "last_result", None)
            if usage is not None:
                tokens, cost, model, latency = usage.tokens, usage.cost_usd, usage.model, usage.latency_ms or latency
                status = usage.status
    except Exception as exc:  # the check must never break the cycle: wake the analyst instead
        log.exception("position_check_failed", inst_id=snapshot.inst_id)
        answer = PositionCheck(wake=True, reason=redact(f"position check failed: {type(exc).__name__}: {exc}")[:2000])
        status = "error"
    data = {"wake": answer.wake, "reason": answer.reason, "status": status, "model": model, "cost_usd": str(cost),
            "checks_before": last.checks}
    return answer, data, (tokens, cost, model, latency)


def screener_feedback_apply(*, row: ScreenerLog, action: str) -> None:
    """Set the analyst's action and the agreement on a screener log row (not saved)."""
    row.analyst_action = str(action)[:20]
    # Agreement only means something when the screener itself said "go".
    row.analyst_agreed = None if row.bypassed or not row.signal else str(action) != "HOLD"


def screener_feedback_record(*, action: str, log_id: int | None = None, cycle_id: int | None = None) -> None:
    """Write the analyst's action back on a screener log row (agreement tracking).

    `log_id` (SCREENING keeps it on the cycle): one UPDATE, the agreement
    decided in SQL from the row's own columns exactly as
    `screener_feedback_apply` decides it. Without it, the cycle's newest row is
    read, then written.
    """
    if log_id is not None:
        ScreenerLog.objects.filter(pk=log_id).update(
            analyst_action=str(action)[:20],
            # Agreement only means something when the screener itself said "go".
            analyst_agreed=Case(When(Q(bypassed=True) | Q(signal=False), then=Value(None)),
                                default=Value(str(action) != "HOLD"), output_field=BooleanField()),
        )
        return
    if cycle_id is None:
        raise ValueError("screener_feedback_record needs log_id or cycle_id")
    row = ScreenerLog.objects.filter(cycle_id=cycle_id).order_by("-id").first()
    if row is None:
        return
    screener_feedback_apply(row=row, action=action)
    row.save(update_fields=["analyst_action", "analyst_agreed"])


def research_run(*, snapshot: MarketSnapshot, cycle_id: int | None = None, mode: str = "live",
                 now: datetime | None = None, instrument: Instrument | None = None) -> ResearchResult | None:
    """Perplexity research when triggered; cached 1 h; a skip is recorded with its reason.

    A replay never researches (today's news says nothing about a past market) and
    records nothing: its cycle says so (tradebot.stages.research), instead of a
    journal event on every triggered cycle of a year.
    """
    if mode != "live":
        return None  # before the imports below: they load the LLM SDKs, seconds a replay would spend for nothing
    from brain.prompts import research_query
    from brain.research import ResearchUnavailable, cache_lookup, cache_store, perplexity_ask, research_triggers, trigger_key

    now = now or snapshot.ts
    try:
        triggers = research_triggers(snapshot=snapshot, now=now)
        if not triggers:
            return None
        if instrument is None or instrument.inst_id != snapshot.inst_id:
            instrument = _instrument(snapshot.inst_id)

        def skipped(reason: str, level: str = EventLevel.INFO) -> None:
            event_record(kind="research_skipped", message=f"research skipped: {reason}", level=level, cycle_id=cycle_id,
                         instrument_id=instrument.pk if instrument else None, mode=mode, data={"triggers": list(triggers.values())})

        key = trigger_key(snapshot.inst_id, list(triggers))
        query = research_query(snapshot, list(triggers.values()), now)
        cached = cache_lookup(key=key, now=now)
        if cached is not None:
            return ResearchResult(**cached.response_json, query=cached.query, triggers=list(triggers.values()),
                                  as_of=cached.created_at, from_cache=True)
        try:
            answer, error, citations = perplexity_ask(query=query, cycle_id=cycle_id, mode=mode)
        except ResearchUnavailable as exc:
            skipped(str(exc))
            return None
        if answer is None:
            skipped(f"research failed: {error}", level=EventLevel.WARNING)
            return None
        if citations and not answer.sources:
            answer = answer.model_copy(update={"sources": citations})
        cache_store(key=key, query=query, answer=answer, now=now)
        return ResearchResult(**answer.model_dump(), query=query, triggers=list(triggers.values()), as_of=now)
    except Exception as exc:  # research is optional: never break the cycle
        log.exception("research_failed", inst_id=snapshot.inst_id)
        event_record(kind="research_skipped", level=EventLevel.WARNING, cycle_id=cycle_id, mode=mode,
                     message=redact(f"research failed: {type(exc).__name__}: {exc}"))
        return None


def decision_bound(decision: Decision, *, symbol: str) -> Decision:
    """An opening decision beyond the hard limits is not passed on: HOLD, with why.

    The risk gate would reject it anyway; stopping it here means text from a
    model (or research it read) never even reaches the gate with such numbers.
    """
    if decision.action not in OPENING_ACTIONS:
        return decision
    d = decision.decision
    problems = []
    if d.leverage > float(settings.MAX_LEVERAGE):
        problems.append(f"leverage {d.leverage}x above {settings.MAX_LEVERAGE}x")
    if d.size_pct > float(settings.MAX_SINGLE_TRADE_PCT):
        problems.append(f"size {d.size_pct:.2%} above {float(settings.MAX_SINGLE_TRADE_PCT):.0%}")
    if d.size_pct <= 0:
        problems.append("size_pct is not positive")
    if d.stop_loss is None:
        problems.append("no stop loss")
    if problems:
        return Decision.hold(symbol, f"analyst proposed {decision.action} outside hard limits ({'; '.join(problems)}); not passed on")
    return decision


def decision_make(*, snapshot: MarketSnapshot, context: BrainContext, research: ResearchResult | None = None,
                  cycle_id: int | None = None, mode: str = "live", brain: Brain | None = None) -> Decision:
    """The cycle's decision; never raises: HOLD with the reason on any failure."""
    try:
        brain = brain or brain_in_use()
        if brain is None:
            return Decision.hold(snapshot.inst_id, "LLM budget exhausted: degrade mode HOLD until 00:00 UTC")
        decision = brain.decide(snapshot=snapshot, context=context, research=research, cycle_id=cycle_id, mode=mode)
        if not isinstance(decision, Decision):
            raise TypeError(f"brain {brain.name} returned {type(decision).__name__}, not a Decision")
        return decision_bound(decision, symbol=snapshot.inst_id)
    except Exception as exc:
        reason = redact(f"decision failed: {type(exc).__name__}: {exc}")[:1000]
        log.exception("decision_failed", inst_id=snapshot.inst_id)
        try:
            event_record(kind="decision_failed", level=EventLevel.ERROR, message=reason, cycle_id=cycle_id, mode=mode)
        except Exception:  # the journal itself failing must not turn a HOLD into a crash
            log.exception("decision_failed_not_journaled")
        return Decision.hold(snapshot.inst_id, reason)
