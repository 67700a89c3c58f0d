"""Celery tasks: thin wrappers over the stage functions and the services.

A stage task takes the cycle id, takes the cycle's lock, claims the stage with
a conditional UPDATE, runs ONE stage function and writes the cycle back with
another conditional UPDATE. It owns only retries (temporary feed/exchange
errors) and time limits; anything else ends the cycle with the error.
"""
from __future__ import annotations

import contextlib
import select
import time
from collections import OrderedDict
from datetime import datetime
from functools import partial
from typing import Any

from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from django.utils import timezone

from execution.exchanges.base import ExchangeUnreachable
from journal.models import Cycle, CycleOutcome, CycleState, EventLevel
from journal.services import event_record
from market.models import Instrument
from tradebot.celery import CYCLE_START_TASK, SENT_AT_HEADER, app
from tradebot.cycle import (
    REALTIME_TRIGGERS,
    Claim,
    cycle_end,
    cycle_locks_forget,
    cycle_locks_held,
    cycle_write_back,
    stage_claim_locked,
)
from tradebot.logging import get_logger, redact
from tradebot.stages import CYCLE_FIELDS, CycleWork, StageEnv, stage_timed

log = get_logger(__name__)
S = CycleState
MAX_RETRIES = 3
# Reflection tasks may run a deep reflection: a long LLM call (REFLECTION_TIMEOUT_SECONDS, retries) beyond a stage's limit.
# They outlast Redis's visibility timeout (the stage limit plus 10 s), so they are acknowledged on receipt
# (acks_late=False): acknowledged late, Redis would hand a running one to a second worker. A review lost with its
# worker is queued again by the account sync's sweep, a deep reflection by the next hourly check.
_REFLECTION_LIMITS: dict[str, Any] = {"soft_time_limit": 900, "time_limit": 960, "acks_late": False}

_ENV: StageEnv | None = None
_PAPER_VENUE: bool | None = None  # whether exchange_from_settings() picked the paper exchange in this process


def live_env(*, feed: bool = True) -> StageEnv:
    """The feed (built once per worker process) and a fresh exchange handle for this task.

    `feed=False`: a task that needs only the exchange (the account sync, the daily reset) never waits for
    or fails on market data (with MARKET_DATA_SOURCE=auto and OKX unreachable the feed cannot be built).

    The exchange handle is re-made per task so a reset paper account (admin,
    tests) is picked up instead of a stale row id, and OKX's live-trading guard
    runs for every task. `exchange_from_settings()` picks the venue once per
    process; a paper handle is then made directly, lazily (its account row is
    read on first use, not for a task that never touches the book).
    """
    global _ENV, _PAPER_VENUE
    from execution.exchanges import exchange_from_settings
    from execution.exchanges.paper import PaperExchange

    if _ENV is None:
        _ENV = StageEnv(feed=None, exchange=None, mode=settings.BOT_MODE)
    if feed and _ENV.feed is None:
        from market.feeds import feed_from_settings

        _ENV.feed = feed_from_settings()  # raises (MarketUnavailable) while there is none: tried again next task
    if _PAPER_VENUE is None:
        _ENV.exchange = exchange_from_settings()
        _PAPER_VENUE = isinstance(_ENV.exchange, PaperExchange)
    elif _PAPER_VENUE:
        _ENV.exchange = PaperExchange(lazy=True)
    else:
        _ENV.exchange = exchange_from_settings()
    return _ENV


def env_reset() -> None:
    """Forget the cached feed and exchange (tests, and after a settings change)."""
    global _ENV, _PAPER_VENUE
    _ENV = None
    _PAPER_VENUE = None


# The brain's context (positions, account, recent trades) as SCREENING built it, for ANALYZING in the
# same process: the replay runs both stages on one CycleWork, so it builds the context once per
# cycle, and live now does too when the same worker runs both (the usual case: both are on `llm`,
# with RESEARCHING between). Keyed by the cycle and SCREENING's start mark, so a re-run screening or
# a reused id (a flushed test database) never hands over another run's context; used only while
# younger than CONTEXT_REUSE_SECONDS, so a slow path (an LLM screen, research, retries) reads afresh.
# Another process simply builds its own. The risk gate never uses it: it reads the account itself.
# The brain SCREENING built goes along (its playbook read once per cycle; see stages.chosen_brain).
CONTEXT_REUSE_SECONDS = 10.0
_CONTEXTS: OrderedDict[tuple[int, str], tuple[float, Any, Any]] = OrderedDict()
_CONTEXTS_MAX = 256


def _context_key(cycle: Cycle) -> tuple[int, str] | None:
    started = ((cycle.stage_times or {}).get(S.SCREENING) or {}).get("started")
    return (cycle.pk, str(started)) if started else None


def _context_keep(work: CycleWork) -> None:
    key = _context_key(work.cycle)
    if key is None or work.context is None:
        return
    _CONTEXTS[key] = (time.monotonic(), work.context, work.extra.get("brain"))
    while len(_CONTEXTS) > _CONTEXTS_MAX:
        _CONTEXTS.popitem(last=False)


def _context_take(work: CycleWork) -> None:
    key = _context_key(work.cycle)
    kept = _CONTEXTS.pop(key, None) if key is not None else None
    if kept is not None and time.monotonic() - kept[0] <= CONTEXT_REUSE_SECONDS:
        work.context = kept[1]
        if kept[2] is not None:
            work.extra["brain"] = kept[2]


def _persist(cycle: Cycle, claimed_state: str, *, snapshot_read: Any = None) -> bool:
    """Write the cycle back only if nobody ended it meanwhile (a stale-sweep or an interrupt).

    The snapshot JSON (the one large field) is written only when the stage
    assigned a new one (COLLECTING): `snapshot_read` is the object the claim
    read; every other field is written every time.
    """
    names = [n for n in CYCLE_FIELDS if n != "snapshot" or cycle.snapshot is not snapshot_read]
    # Nothing after the write-back needs the cycle's lock: the statement releases it (PostgreSQL).
    written = cycle_write_back(cycle=cycle, claimed_state=claimed_state, fields=names, release_lock=True)
    if not written:
        log.warning("cycle_changed_under_stage", cycle_id=cycle.pk, expected=claimed_state)
    return bool(written)


def stage_run(task: Task, cycle_id: int, stage: str, *, resume_states: frozenset[str] | None = None) -> int | None:
    """Lock and claim, run, persist, then what follows the stage. Returns the cycle id when the chain should go on."""
    after: list[Cycle] = []
    result = _stage_run_locked(task, cycle_id, stage, resume_states=resume_states, after=after)
    for cycle in after:  # with the cycle's lock released: nothing here needs it
        _after_execution(cycle)
    return result


def _after_execution(cycle: Cycle) -> None:
    """A close or reduce order closes trades (execution's account sync right after it): ask for their reviews.

    Execution cannot queue work on this layer, so this task asks for the
    reviews of every live trade closed while EXECUTING ran (its first start),
    not only this instrument's: the sync after the order may also have closed
    another position (its stop hit). The asking (a claim per trade) runs in its
    own task on the reflection queue, off the cycle's path: here it is one send,
    after the cycle's write-back committed. Never raises: the order is placed
    and journaled, and the beat's account sync sweeps for unreviewed closes too.
    """
    from brain.schemas import OPENING_ACTIONS

    action = str((cycle.order or {}).get("action") or "")
    if not action or action in OPENING_ACTIONS or cycle.mode != settings.BOT_MODE:
        return
    started = ((cycle.stage_times or {}).get(S.EXECUTING) or {}).get("started")
    transaction.on_commit(partial(_reviews_sweep_send, requested_by=f"cycle {cycle.pk} {action}", since=started))


def _reviews_sweep_send(*, requested_by: str, since: str | None) -> None:
    try:
        app.signature(REVIEWS_SWEEP_TASK, kwargs={"requested_by": requested_by, "since": since}).set(
            queue="reflection").apply_async()
    except Exception as exc:  # noqa: BLE001 - the beat's account sync sweeps for it again
        log.error("trade_reviews_not_requested", requested_by=requested_by, error=redact(str(exc)))


def _stage_run_locked(task: Task, cycle_id: int, stage: str, *, resume_states: frozenset[str] | None,
                      after: list[Cycle]) -> int | None:
    claim_started = time.perf_counter()
    with stage_claim_locked(cycle_id=cycle_id, stage=stage, resume_states=resume_states) as (claim, cycle):
        claim_ms = round((time.perf_counter() - claim_started) * 1000, 3)
        if claim == Claim.BUSY:
            # Another worker runs a stage of this cycle right now: this delivery is a duplicate.
            log.info("stage_duplicate", cycle_id=cycle_id, stage=stage)
            task.request.chain = None
            return None
        if claim == Claim.STOP or cycle is None:
            task.request.chain = None
            return None
        if claim == Claim.CONTINUE:
            return cycle_id
        claimed_state = cycle.state
        snapshot_read = cycle.snapshot
        work = CycleWork(cycle=cycle)
        if stage == S.ANALYZING:
            _context_take(work)
        started = time.perf_counter()
        try:
            # Only COLLECTING reads the market: the brain's and the gate's workers never build a feed.
            go_on = stage_timed(work, live_env(feed=stage == S.COLLECTING), stage)
            if stage == S.SCREENING and go_on:
                _context_keep(work)
        except Retry:
            raise
        except SoftTimeLimitExceeded:
            go_on = _fail(work, stage, "time limit exceeded", outcome=CycleOutcome.ERROR)
        except ExchangeUnreachable as exc:
            # Fail fast, no retry (retries only held the instrument's next ticks back): no new entry is attempted,
            # the open positions stay protected by their exchange-side stops, verified when it answers again (#16).
            from execution.outages import exchange_unreachable_record

            exchange_unreachable_record(error=str(exc), where=stage, mode=cycle.mode)
            go_on = _fail(work, stage, f"exchange unreachable ({exc}); no new entry, open positions keep their "
                          "exchange-side stops", outcome=CycleOutcome.ERROR)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a journaled cycle end
            if getattr(exc, "retryable", False) and task.request.retries < MAX_RETRIES:
                _persist(cycle, claimed_state, snapshot_read=snapshot_read)
                log.warning("stage_retry", cycle_id=cycle_id, stage=stage, error=redact(str(exc)))
                raise task.retry(exc=exc, countdown=min(2 ** task.request.retries, 10)) from exc
            go_on = _fail(work, stage, f"{type(exc).__name__}: {exc}", outcome=CycleOutcome.ERROR)
        entry = cycle.stage_times.setdefault(stage, {})
        entry.setdefault("duration_ms", round((time.perf_counter() - started) * 1000, 3))
        entry["claim_ms"] = claim_ms  # the lock, the claim and the row (bench: the bookkeeping per stage)
        entry["done"] = True
        entry["queue"] = (task.request.delivery_info or {}).get("routing_key", "")
        _persist(cycle, claimed_state, snapshot_read=snapshot_read)
        if stage == S.EXECUTING and cycle.order:
            after.append(cycle)
        if not go_on:
            task.request.chain = None
            return None
        return cycle_id


def _fail(work: CycleWork, stage: str, message: str, *, outcome: str) -> bool:
    cycle = work.cycle
    message = redact(message)
    log.error("stage_failed", cycle_id=cycle.pk, stage=stage, error=message)
    cycle_end(cycle, outcome=outcome, reason=f"{stage} failed: {message}"[:500], error=message, state=S.FAILED)
    event_record(kind="cycle_failed", message=f"cycle {cycle.pk} {stage}: {message}", level=EventLevel.ERROR,
                 instrument_id=cycle.instrument_id, cycle_id=cycle.pk, mode=cycle.mode)
    return False


# --- stage tasks (queues are set on the chain's signatures; see tradebot.pipeline) ---------

# Acknowledged after the stage ran and handed back to the broker when its worker dies (SIGKILL, OOM): safe, every
# stage claims its cycle (a finished stage continues the chain, a dead one resumes). Redis hands an unacknowledged
# task out again after its visibility timeout, which defaults to the time limit plus 10 s (settings).
_STAGE_OPTS: dict[str, Any] = {"bind": True, "acks_late": True, "reject_on_worker_lost": True,
                               "max_retries": MAX_RETRIES}


@app.task(name="tradebot.tasks.cycle_collect", **_STAGE_OPTS)
def cycle_collect(self: Task, cycle_id: int) -> int | None:
    return stage_run(self, cycle_id, S.COLLECTING)


@app.task(name="tradebot.tasks.cycle_screen", **_STAGE_OPTS)
def cycle_screen(self: Task, cycle_id: int) -> int | None:
    return stage_run(self, cycle_id, S.SCREENING)


@app.task(name="tradebot.tasks.cycle_research", **_STAGE_OPTS)
def cycle_research(self: Task, cycle_id: int) -> int | None:
    return stage_run(self, cycle_id, S.RESEARCHING)


@app.task(name="tradebot.tasks.cycle_analyze", **_STAGE_OPTS)
def cycle_analyze(self: Task, cycle_id: int) -> int | None:
    return stage_run(self, cycle_id, S.ANALYZING)


@app.task(name="tradebot.tasks.cycle_risk_check", **_STAGE_OPTS)
def cycle_risk_check(self: Task, cycle_id: int) -> int | None:
    return stage_run(self, cycle_id, S.RISK_CHECK)


@app.task(name="tradebot.tasks.cycle_execute", **_STAGE_OPTS)
def cycle_execute(self: Task, cycle_id: int) -> int | None:
    # Found in EXECUTING or CONFIRMING with the lock free: the worker died there. order_place is
    # idempotent by client order id, so running again finds the order instead of placing a second.
    return stage_run(self, cycle_id, S.EXECUTING, resume_states=frozenset({S.EXECUTING, S.CONFIRMING}))


@app.task(name="tradebot.tasks.cycle_journal", **_STAGE_OPTS)
def cycle_journal(self: Task, cycle_id: int) -> int | None:
    return stage_run(self, cycle_id, S.JOURNALING)


# --- beat entries -------------------------------------------------------------------


# What a task meets while PostgreSQL is down or restarting (psycopg's errors come as these).
_DB_DOWN = (OperationalError, InterfaceError)


def _db_down_retry(task: Task, exc: Exception, *, deadline: float | None, what: str) -> None:
    """Retry a beat task the database refused, every 1-5 s, while it still has time; else log one line and give up."""
    countdown = min(2 ** task.request.retries, 5)
    if deadline is not None and time.time() + countdown < deadline:
        log.warning(f"{what}_db_unavailable_retrying", error=redact(str(exc).strip().splitlines()[0] if str(exc) else
                                                                     type(exc).__name__), retry_in_s=countdown)
        raise task.retry(countdown=countdown, max_retries=None) from exc
    log.error(f"{what}_db_unavailable_given_up", error=redact(type(exc).__name__))


@app.task(name=CYCLE_START_TASK, bind=True, acks_late=True)
def cycle_start(self: Task, inst_id: str, as_of: str | None = None, trigger: str = "beat") -> int | None:
    """Beat's per-instrument entry: open the cycle (or record a skip) and send its chain.

    A beat tick (no `as_of`) is for the time it was sent; sent more than one interval ago it is recorded
    SKIPPED ("late"), and ticks that never arrived are recorded as a gap by this one. While the database is
    down the tick is retried within its interval; if it cannot run in time, the next tick records the gap.
    """
    from tradebot.pipeline import cycle_launch

    every = int(settings.DECISION_CYCLE_SECONDS)
    # A worker puts a message's own headers on the request; an eager call keeps them in `request.headers`.
    headers = getattr(self.request, "headers", None) or {}
    sent_raw = getattr(self.request, SENT_AT_HEADER, None) or headers.get(SENT_AT_HEADER)
    sent_at = datetime.fromisoformat(sent_raw) if sent_raw else None
    try:
        instrument = Instrument.objects.filter(inst_id=inst_id).first()
        if instrument is None or not instrument.trading_enabled:
            log.info("cycle_not_started", inst_id=inst_id, reason="unknown or trading disabled")
            return None
        if as_of:
            return cycle_launch(instrument=instrument, as_of=datetime.fromisoformat(as_of), trigger=trigger,
                                mode=settings.BOT_MODE).pk
        # Beat's ticks and runbot's first cycle at start are on the real-time clock: the ticks missed since the
        # newest cycle (an outage, or the bot stopped) are recorded as a gap first, and a beat tick that waited more
        # than an interval is SKIPPED ("late"). Runbot's first cycle is for the moment it runs, however long its
        # workers took to start (the time they took is part of the gap it records).
        realtime = trigger in REALTIME_TRIGGERS
        beat = trigger == "beat"
        return cycle_launch(instrument=instrument, as_of=(sent_at if beat else None) or timezone.now(), trigger=trigger,
                            mode=settings.BOT_MODE, sent_at=sent_at if beat else None,
                            tick_every=every if realtime else None).pk
    except _DB_DOWN as exc:
        _db_down_retry(self, exc, deadline=(sent_at.timestamp() + every) if sent_at else None, what="cycle_start")
        return None


# Failed syncs this process has not journaled yet: the database was down, or the exchange unreachable (an outage
# is one journal event of its own; its failed syncs are one event with their count when a sync succeeds again).
_SYNC_FAILURES = {"count": 0, "first": "", "why": ""}


def _sync_failure_count(why: str) -> None:
    _SYNC_FAILURES["count"] = int(_SYNC_FAILURES["count"]) + 1
    _SYNC_FAILURES["first"] = _SYNC_FAILURES["first"] or timezone.now().isoformat()
    _SYNC_FAILURES["why"] = _SYNC_FAILURES["why"] or why


def account_sync_failures_journal() -> None:
    """Journal the syncs that failed while the database was down (or the exchange unreachable), once a sync
    succeeds again: one event with the count."""
    if not _SYNC_FAILURES["count"]:
        return
    n, first, why = _SYNC_FAILURES["count"], _SYNC_FAILURES["first"], _SYNC_FAILURES["why"]
    event_record(kind="account_sync_failed", message=f"{n} account sync(s) failed since {first}: {why}",
                 level=EventLevel.ERROR, mode=settings.BOT_MODE, data={"count": n, "since": first})
    _SYNC_FAILURES.update(count=0, first="", why="")


@app.task(name="tradebot.tasks.account_sync", bind=True, acks_late=True, max_retries=0)
def account_sync(self: Task) -> list[int]:
    """Reconcile with the exchange; every trade it closed gets a post-trade review.

    It also sweeps the trades closed lately by any other path (a brain's CLOSE,
    a flatten) whose review was never queued (a send the broker refused, a
    worker that died between the close and the request): each is queued once.
    A failed sync is one log line and an `account_sync_failed` event (counted in `bot status`); while the
    database is down the failures are counted here and journaled by the first sync that reaches it.
    """
    from execution.sync import account_sync as sync
    from tradebot.reflection import trade_reviews_request

    try:
        result = sync(exchange=live_env(feed=False).exchange, mode=settings.BOT_MODE)
        account_sync_failures_journal()
    except _DB_DOWN as exc:
        _sync_failure_count("database unavailable")
        log.error("account_sync_failed", error=type(exc).__name__, pending=_SYNC_FAILURES["count"])
        return []
    except ExchangeUnreachable as exc:
        from execution.outages import exchange_unreachable_record

        _sync_failure_count("exchange unreachable")
        log.error("account_sync_failed", error=redact(f"exchange unreachable: {exc}")[:300],
                  pending=_SYNC_FAILURES["count"])
        with contextlib.suppress(DatabaseError):
            exchange_unreachable_record(error=str(exc), where="account sync", mode=settings.BOT_MODE)
        return []
    except Exception as exc:  # noqa: BLE001 - the next sync (every ACCOUNT_SYNC_SECONDS) tries again
        message = redact(f"{type(exc).__name__}: {exc}")[:500]
        log.error("account_sync_failed", error=message)
        with contextlib.suppress(DatabaseError):
            event_record(kind="account_sync_failed", message=f"account sync failed: {message}",
                         level=EventLevel.ERROR, mode=settings.BOT_MODE, data={"count": 1})
        return []
    closed = list(getattr(result, "closed_trade_ids", []) or [])
    trade_reviews_request(trade_ids=closed, mode=settings.BOT_MODE, requested_by="account_sync")
    return closed


REVIEWS_SWEEP_TASK = "tradebot.tasks.reflection_reviews_sweep"


@app.task(name=REVIEWS_SWEEP_TASK, bind=True, acks_late=True)
def reflection_reviews_sweep(self: Task, requested_by: str = "", since: str | None = None) -> list[int]:
    """Queue a review for each live trade closed since `since` (ISO time) without one: after a CLOSE/REDUCE order."""
    from tradebot.reflection import trade_reviews_request

    return trade_reviews_request(mode=settings.BOT_MODE, since=datetime.fromisoformat(since) if since else None,
                                 requested_by=requested_by)


@app.task(name="tradebot.tasks.reflection_trade_review", bind=True, **_REFLECTION_LIMITS)
def reflection_trade_review(self: Task, trade_id: int) -> int | None:
    from tradebot.reflection import trade_review_request

    return trade_review_request(trade_id=trade_id)


@app.task(name="tradebot.tasks.reflection_deep", bind=True, **_REFLECTION_LIMITS)
def reflection_deep(self: Task) -> int | None:
    """Beat's timer: the deep reflection when due (20 trades or 6 h); a candidate goes on to validation."""
    from tradebot.reflection import deep_reflection_if_due

    return deep_reflection_if_due(mode=settings.BOT_MODE)


@app.task(name="tradebot.tasks.reflection_playbook_validate", bind=True, acks_late=False, soft_time_limit=3 * 3600,
          time_limit=3 * 3600 + 300)  # two replays of PLAYBOOK_VALIDATION_DAYS: far longer than a stage
def reflection_playbook_validate(self: Task, candidate_id: int) -> bool | None:
    """Replay a candidate against the active playbook; promote or reject it (figures kept on the version)."""
    from datetime import timedelta

    from django.conf import settings

    from tradebot.learning import ValidationError, playbook_candidate_validate

    try:
        outcome = playbook_candidate_validate(
            candidate_id=candidate_id, cycle=timedelta(seconds=settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS))
    except ValidationError as exc:  # already decided (a redelivery), or gone: nothing to do
        log.warning("playbook_validation_skipped", candidate_id=candidate_id, reason=str(exc))
        return None
    return outcome.promoted


@app.task(name="tradebot.tasks.reflection_search_trial", bind=True, acks_late=False, soft_time_limit=3 * 3600,
          time_limit=3 * 3600 + 300)
def reflection_search_trial(self: Task, ticket_id: int) -> str | None:
    """One parameter-search trial (`manage.py optimize`): the replays of its training windows.

    Acknowledged on receipt like the other reflection tasks (a trial outlasts Redis's visibility timeout); a
    worker that dies loses its trial only: its heartbeat stops, the command marks it lost and asks another.
    """
    from tradebot.search import search_trial_run

    return search_trial_run(ticket_id=ticket_id, worker=self.request.hostname or "worker", dispatch="worker")


@app.task(name="tradebot.tasks.reflection_performance_snapshot", bind=True, acks_late=True)
def reflection_performance_snapshot(self: Task, period: str) -> int:
    from tradebot.performance import performance_snapshot_record

    return performance_snapshot_record(period=period, exchange=live_env(feed=False).exchange).pk


@app.task(name="tradebot.tasks.risk_daily_reset", bind=True, acks_late=True)
def risk_daily_reset(self: Task) -> None:
    from tradebot.reflection import risk_day_reset

    risk_day_reset(exchange=live_env(feed=False).exchange)


@app.task(name="tradebot.tasks.watchlist_refresh", bind=True, acks_late=True, max_retries=3)
def watchlist_refresh(self: Task) -> list[str]:
    """Beat's daily top-N selection (WATCHLIST_TOP_N > 0); a temporary OKX error retries in 5 minutes."""
    from market.feeds.base import FeedTemporaryError
    from tradebot.watchlist import watchlist_top_n_refresh

    try:
        report = watchlist_top_n_refresh(exchange=live_env().exchange)
    except FeedTemporaryError as exc:
        raise self.retry(exc=exc, countdown=300) from exc
    return report.enabled


# --- worker warm-up and the connection between tasks -----------------------------------------------------------------


def _warm_up(**_: Any) -> None:
    """Before the first task, what that worker's stages load lazily, so the first cycle is not the slow one (and a
    worker started again after a crash is back at full speed when it says ready).

    `okx` (COLLECTING): the feed and one snapshot; `orders` (EXECUTING/CONFIRMING, the account sync): the execution
    services and the exchange handle; `llm` (SCREENING .. ANALYZING): the brain's modules; `default` (RISK_CHECK,
    JOURNALING): the risk gate's services. Nothing is written. On a busy machine a cold first stage took ~20 s, more
    than a stage's time limit.
    """
    consumed = set(app.amqp.queues.consume_from or ()) or {"okx", "orders", "llm", "default"}
    try:
        if consumed & {"okx", "orders", "default"}:
            import execution.services  # noqa: F401 - the order path and the risk gate's bookkeeping
            import execution.sync  # noqa: F401 - the account sync
        if "orders" in consumed:
            live_env(feed=False)  # the venue picked once per process (OKX: its client and live-trading guard)
        if "llm" in consumed:
            import brain.rules  # noqa: F401 - the offline brain (Claude's SDK loads with its first call)
            import brain.services  # noqa: F401 - the screener, the analyst, research
            import brain.watch  # noqa: F401
        if "okx" in consumed:
            env = live_env()
            inst = Instrument.objects.filter(trading_enabled=True).values_list("inst_id", flat=True).first()
            if env.feed is not None and inst:
                from market.snapshot import snapshot_build

                snapshot_build(feed=env.feed, inst_id=inst)
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs time on the first task
        log.warning("worker_warm_up_failed", error=redact(str(exc)))


def db_task_boundary(task: Task | None = None, **_: Any) -> None:
    """Before and after every task: Django's request-boundary rule for the database connection.

    A healthy connection is kept for the next task (CONN_MAX_AGE); a broken one,
    one past its age or one left inside a transaction is closed. A cycle lock
    still held here leaked (its release failed): closing the session is what
    frees an advisory lock for sure, so the connection is dropped then.
    Eager tasks (tests, `CELERY_TASK_ALWAYS_EAGER`) run inside the caller's
    transaction and are left alone.

    The health check (CONN_HEALTH_CHECKS) is done here without a round trip:
    Django's own is a `SELECT 1` before each task's first query (7 per cycle).
    A PostgreSQL session that the server ended while the worker was idle
    (a restart, `pg_terminate_backend`, an idle timeout) has the server's
    goodbye or the end of the stream waiting on its socket; an idle healthy
    one has nothing to read. So a readable socket closes the connection (the
    task then opens a new one), and an idle one counts as checked.
    """
    from django.db import connections

    if task is not None and getattr(task.request, "is_eager", False):
        return
    leaked = cycle_locks_held()
    if leaked:
        log.error("cycle_lock_leaked", cycle_ids=sorted(leaked))
        for conn in connections.all(initialized_only=True):
            with contextlib.suppress(DatabaseError):  # a broken session is gone either way (close() drops it)
                conn.close()
        cycle_locks_forget()
        return
    for conn in connections.all(initialized_only=True):
        conn.close_if_unusable_or_obsolete()
        if conn.vendor != "postgresql" or conn.connection is None:
            continue
        if _session_ended_by_server(conn.connection):
            log.warning("db_session_ended_by_server", alias=conn.alias)
            with contextlib.suppress(DatabaseError):
                conn.close()
        else:
            conn.health_check_done = True  # checked above: no SELECT 1 before this task's first query


def _session_ended_by_server(raw: Any) -> bool:
    """True when a psycopg connection is closed, broken, or has input waiting while idle between tasks.

    Between tasks we sent nothing, so anything to read (the server's FATAL
    message, EOF, an error) means the session is over. A false alarm (an
    unasked notice) costs only a reconnection.
    """
    try:
        if raw.closed or getattr(raw, "broken", False):  # psycopg 3 knows `broken`
            return True
        poller = select.poll()
        poller.register(raw.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no socket to look at: do not trust it
        return True


def _connect_worker_signals() -> None:
    from celery.signals import task_postrun, task_prerun, worker_process_init, worker_ready

    worker_process_init.connect(_warm_up, weak=False)  # prefork children
    worker_ready.connect(_warm_up, weak=False)  # solo / threads pools run tasks in the main process
    task_prerun.connect(db_task_boundary, weak=False)
    task_postrun.connect(db_task_boundary, weak=False)


_connect_worker_signals()
