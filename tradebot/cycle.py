"""Cycle mechanics: open, claim a stage, end. The state machine lives here.

Every stage task claims its cycle with a conditional UPDATE
(`filter(pk=..., state__in=<previous>).update(state=<stage>)`), so a
redelivered or duplicated task finds the state moved on and does nothing.
A per-cycle lock (a PostgreSQL session advisory lock, or a file lock on
SQLite) is held while a stage runs; the lock dies with the process that held
it, which is how a redelivered task tells "the worker running this stage died"
(take the lock, resume: stages are idempotent) from "it is still running"
(lock busy: do nothing).

One cycle per instrument at a time: `cycle_open` finds an unfinished cycle and
records a SKIPPED cycle with the reason instead of queuing behind it; a cycle
whose stage is older than that stage's time limit is marked INTERRUPTED so a lost
worker blocks the instrument for one limit at most (`stage_limit_seconds`).
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from journal.models import TERMINAL_CYCLE_STATES, Cycle, CycleOutcome, CycleState, Mode
from market.models import Instrument
from tradebot.logging import get_logger, redact

log = get_logger(__name__)

S = CycleState

# The allowed transitions: the pipeline's order, and any running state may end.
_ENDINGS = {S.DONE, S.FAILED, S.INTERRUPTED}
TRANSITIONS: dict[str, frozenset[str]] = {
    S.IDLE: frozenset({S.COLLECTING, *_ENDINGS}),
    S.COLLECTING: frozenset({S.SCREENING, *_ENDINGS}),
    S.SCREENING: frozenset({S.RESEARCHING, S.ANALYZING, *_ENDINGS}),
    S.RESEARCHING: frozenset({S.ANALYZING, *_ENDINGS}),
    S.ANALYZING: frozenset({S.RISK_CHECK, *_ENDINGS}),
    S.RISK_CHECK: frozenset({S.EXECUTING, *_ENDINGS}),
    S.EXECUTING: frozenset({S.CONFIRMING, *_ENDINGS}),
    S.CONFIRMING: frozenset({S.JOURNALING, *_ENDINGS}),
    S.JOURNALING: frozenset(_ENDINGS),
    S.DONE: frozenset(),
    S.SKIPPED: frozenset(),
    S.FAILED: frozenset(),
    S.INTERRUPTED: frozenset(),
}
ACTIVE_STATES = frozenset(s for s in S.values if s not in TERMINAL_CYCLE_STATES and s != S.REFLECTING)


def previous_states(stage: str) -> frozenset[str]:
    """The states a stage may claim the cycle from."""
    return frozenset(src for src, dsts in TRANSITIONS.items() if stage in dsts)


class TransitionError(Exception):
    """A state change the table does not allow (a bug, not a market condition)."""


def transition_check(current: str, new: str) -> None:
    if new not in TRANSITIONS.get(current, frozenset()):
        raise TransitionError(f"cycle state {current} -> {new} is not allowed")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- opening ------------------------------------------------------------------


def stage_limit_seconds(state: str) -> float:
    """How long a cycle may stay in `state` since the stage's (re)start: the stage task's hard time limit plus a hop.

    Past this no worker can still be running the stage (Celery's hard limit kills it), so the cycle was lost
    with its worker, or its next hop with the broker. Every stage task runs under CELERY_TASK_TIME_LIMIT.
    """
    return float(settings.CELERY_TASK_TIME_LIMIT + settings.CYCLE_STAGE_GRACE_SECONDS)


def _stage_age(cycle: Cycle, now: datetime) -> float:
    entry = (cycle.stage_times or {}).get(cycle.state) or {}
    mark = entry.get("resumed") or entry.get("started")
    since = cycle.started_at
    if mark:
        with contextlib.suppress(ValueError, TypeError):
            since = datetime.fromisoformat(str(mark))
    return (now - since).total_seconds()


# The triggers whose cycles are on the real-time tick grid (beat's ticks, runbot's first cycle at start): only
# between those is a missing tick a gap to record (a manual, stream or replay cycle is off the grid).
REALTIME_TRIGGERS = ("beat", "start")


def _skipped(*, instrument: Instrument, mode: str, run_id: str, as_of: datetime, reason: str, now: datetime,
             times: dict[str, object]) -> Cycle:
    skipped = Cycle.objects.create(
        instrument=instrument, mode=mode, run_id=run_id, as_of=as_of, state=S.SKIPPED,
        outcome=CycleOutcome.SKIPPED, reason=reason[:4000], ended_at=now, stage_times=times,
    )
    log.info("cycle_skipped", cycle_id=skipped.pk, inst_id=instrument.inst_id, reason=reason)
    return skipped


def cycle_open(
    *,
    instrument: Instrument,
    as_of: datetime,
    mode: str = Mode.LIVE,
    run_id: str = "",
    trigger: str = "beat",
    now: datetime | None = None,
    sent_at: datetime | None = None,
    tick_every: int | None = None,
) -> Cycle:
    """Create the next cycle for an instrument, or a SKIPPED one with the reason when it must not run.

    SKIPPED: the previous cycle still runs (never queued behind it); the tick is for a time before the
    instrument's newest cycle (a redelivered or reordered tick); the tick was sent (`sent_at`) more than
    one interval ago (`tick_every`, e.g. it waited in the broker through an outage: a burst of old ticks
    must not trade). A cycle whose stage is past that stage's time limit is marked INTERRUPTED first.
    With `tick_every` (beat's real-time ticks), ticks that never became a cycle since the newest one
    (the broker or the database was down, the bot stopped) are recorded as one SKIPPED gap row
    (`stage_times.missed_ticks`) before this one. The instrument row is locked for the check-and-create
    so two ticks (or a tick and `bot run-cycle`) cannot both start a cycle.
    """
    now = now or timezone.now()
    with transaction.atomic():
        list(Instrument.objects.select_for_update().filter(pk=instrument.pk).values_list("pk", flat=True))  # the lock only
        running = list(
            Cycle.objects.filter(instrument=instrument, mode=mode, run_id=run_id, state__in=ACTIVE_STATES)
            .only("id", "state", "started_at", "stage_times").order_by("id")
        )
        blocking: Cycle | None = None
        for cycle in running:
            age = _stage_age(cycle, now)
            limit = stage_limit_seconds(cycle.state)
            if age > limit:
                # Past the stage's hard time limit: its worker (or its next hop) is gone. Free the instrument.
                Cycle.objects.filter(pk=cycle.pk, state=cycle.state).update(
                    state=S.INTERRUPTED,
                    outcome=CycleOutcome.INTERRUPTED,
                    ended_at=now,
                    reason=f"stale: still {cycle.state} {age:.0f}s after the stage started (its limit {limit:.0f}s)",
                )
                log.warning("cycle_stale_interrupted", cycle_id=cycle.pk, state=cycle.state, age_s=round(age))
            else:
                blocking = cycle
        times: dict[str, object] = {"trigger": trigger}
        kw = {"instrument": instrument, "mode": mode, "run_id": run_id, "now": now}
        if blocking is not None:
            reason = (
                f"previous cycle {blocking.pk} still {blocking.state} "
                f"(started {(now - blocking.started_at).total_seconds():.0f}s ago)"
            )
            return _skipped(as_of=as_of, reason=reason, times=times, **kw)
        newest = (Cycle.objects.filter(instrument=instrument, mode=mode, run_id=run_id)
                  .only("id", "as_of", "stage_times").order_by("-as_of", "-id").first())
        if newest is not None and as_of < newest.as_of:
            reason = (f"out of order: a tick for {as_of.isoformat()} after cycle {newest.pk} for "
                      f"{newest.as_of.isoformat()}")
            return _skipped(as_of=as_of, reason=reason, times=times, **kw)
        # The ticks missed since the newest cycle first (also before a late tick: its own row follows them).
        on_grid = (*REALTIME_TRIGGERS, "gap")
        if tick_every and newest is not None and (newest.stage_times or {}).get("trigger") in on_grid:
            missed = round((as_of - newest.as_of).total_seconds() / tick_every) - 1
            if missed >= 1:
                first = newest.as_of + timedelta(seconds=tick_every)
                reason = (f"{missed} tick(s) from {first.isoformat()} to {as_of.isoformat()} never ran: the broker or "
                          "the database was unavailable, or the bot was stopped")
                _skipped(as_of=first, reason=reason, times={"trigger": "gap", "missed_ticks": missed}, **kw)
        if sent_at is not None and tick_every and (now - sent_at).total_seconds() > tick_every:
            reason = (f"late: the tick was sent {(now - sent_at).total_seconds():.0f}s ago, more than one interval "
                      f"({tick_every}s)")
            return _skipped(as_of=as_of, reason=reason, times=times, **kw)
        return Cycle.objects.create(
            instrument=instrument, mode=mode, run_id=run_id, as_of=as_of, state=S.IDLE, stage_times=times
        )


# --- the per-cycle lock ---------------------------------------------------------

_LOCK_NAMESPACE = 0x7B07  # keeps our advisory keys apart from anyone else's on the server


class _Held(threading.local):
    """Cycle ids whose PostgreSQL advisory lock this thread's connection holds right now.

    A lock still listed when a task ends leaked (its release failed): the worker then closes its
    database session, which frees it, instead of keeping it into the next task on a reused
    connection (tradebot.tasks.db_task_boundary). Per thread, as Django's connections are.
    """

    def __init__(self) -> None:
        self.ids: set[int] = set()


_HELD = _Held()


def _lock_key(cycle_id: int) -> int:
    return int(cycle_id) & 0x7FFFFFFF


def cycle_locks_held() -> frozenset[int]:
    """The cycles whose advisory lock this process holds (PostgreSQL)."""
    return frozenset(_HELD.ids)


def cycle_locks_forget() -> None:
    """After the session that held them was closed: the server released them."""
    _HELD.ids.clear()


def _pg_unlock(cycle_id: int) -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s, %s)", [_LOCK_NAMESPACE, _lock_key(cycle_id)])
    _HELD.ids.discard(cycle_id)


@contextmanager
def cycle_lock(cycle_id: int) -> Iterator[bool]:
    """Try to take the cycle's lock without waiting; yields whether we hold it.

    PostgreSQL: a session advisory lock (several machines, one database).
    SQLite: an flock on a file under VAR_DIR (one machine). Both are released
    by the operating system or the server when the holder dies.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", [_LOCK_NAMESPACE, _lock_key(cycle_id)])
            got = bool(cur.fetchone()[0])
        if got:
            _HELD.ids.add(cycle_id)
        try:
            yield got
        finally:
            if got:
                _pg_unlock(cycle_id)
        return
    lock_dir = Path(settings.VAR_DIR) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"cycle-{zlib.crc32(str(settings.DATABASES['default']['NAME']).encode())}-{cycle_id}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            got = True
        except BlockingIOError:
            got = False
        try:
            yield got
        finally:
            if got:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- claiming and ending --------------------------------------------------------


class Claim:
    """What a stage task may do with a cycle: run the stage, continue the chain, or stop."""

    RUN = "run"  # we own the stage now (claimed, or resuming after a dead worker)
    CONTINUE = "continue"  # the stage already finished; let the chain go on
    STOP = "stop"  # the cycle moved on or ended
    BUSY = "busy"  # another worker holds the cycle's lock: this delivery is a duplicate


def _cycle_read(cycle_id: int, *, lock: bool = False) -> Cycle | None:
    rows = Cycle.objects.filter(pk=cycle_id).select_related("instrument")
    if lock:
        rows = rows.select_for_update(of=("self",))
    return rows.first()


def _claim_not_won(*, cycle_id: int, stage: str, resume_states: frozenset[str] | None, now: datetime) -> tuple[str, Cycle | None]:
    """The conditional UPDATE did not move the cycle: resume a stage whose worker died, continue, or stop.

    The row is read under its row lock. On PostgreSQL the previous holder releases the cycle's lock
    inside its write-back statement, a moment before that statement commits (`cycle_write_back`):
    a duplicate delivery that takes the lock in that moment must not read the row as it was before
    the write-back (its stage not "done": it would run the stage again). `FOR UPDATE` waits for the
    write-back's commit and then returns the row it wrote. A rare path (duplicates, dead workers).
    """
    with transaction.atomic():
        cycle = _cycle_read(cycle_id, lock=connection.vendor == "postgresql")
        if cycle is None:
            return Claim.STOP, None
        if cycle.state in (resume_states or frozenset({stage})):
            if (cycle.stage_times.get(stage) or {}).get("done"):
                return Claim.CONTINUE, cycle
            entry = dict(cycle.stage_times.get(stage) or {})
            entry.update({"resumed": now.isoformat(), "worker": worker_name(), "attempts": int(entry.get("attempts", 1)) + 1})
            entry.setdefault("started", now.isoformat())
            cycle.stage_times[stage] = entry
            Cycle.objects.filter(pk=cycle_id).update(stage_times=cycle.stage_times)
            log.warning("stage_resumed", cycle_id=cycle_id, stage=stage, state=cycle.state)
            return Claim.RUN, cycle
        return Claim.STOP, cycle


def stage_claim(*, cycle_id: int, stage: str, resume_states: frozenset[str] | None = None) -> tuple[str, Cycle | None]:
    """Claim `stage` for a cycle; the caller must hold `cycle_lock(cycle_id)`.

    `resume_states`: states in which this stage's task was already running or
    done (e.g. EXECUTING and CONFIRMING for the execute task). Found there with
    the lock free, its worker died: RUN again if the stage did not finish
    (stages are idempotent), CONTINUE if it did.
    """
    now = timezone.now()
    claimed = Cycle.objects.filter(pk=cycle_id, state__in=previous_states(stage)).update(state=stage)
    if not claimed:
        return _claim_not_won(cycle_id=cycle_id, stage=stage, resume_states=resume_states, now=now)
    cycle = _cycle_read(cycle_id)
    if cycle is None:
        return Claim.STOP, None
    cycle.stage_times[stage] = {"started": now.isoformat(), "worker": worker_name()}
    Cycle.objects.filter(pk=cycle_id).update(stage_times=cycle.stage_times)
    return Claim.RUN, cycle


# PostgreSQL: the lock, the conditional UPDATE (with the stage's start mark) and the claimed row with
# its instrument, in ONE round trip. The lock CTE is MATERIALIZED, so pg_try_advisory_lock runs
# exactly once; a data-modifying CTE always runs to completion; the outer SELECT always returns one
# row: whether we now hold the lock, then the cycle as the UPDATE left it (NULLs when it did not
# move it). The UPDATE runs only when the lock was won and (READ COMMITTED) re-checks `state` on the
# newest committed row version before writing: it claims exactly when lock-then-UPDATE would.
_PG_CLAIM_SQL = """
WITH lk AS MATERIALIZED (SELECT pg_try_advisory_lock(%s, %s) AS held),
upd AS (
    UPDATE {cycle} SET state = %s, stage_times = {cycle}.stage_times || jsonb_build_object(%s::text, %s::jsonb)
    FROM lk
    WHERE lk.held AND {cycle}.id = %s AND {cycle}.state = ANY(%s) AND {async_commit}
    RETURNING {cycle}.*
)
SELECT lk.held, {cycle_cols}, {instrument_cols}
FROM lk LEFT JOIN upd ON true LEFT JOIN {instrument} inst ON inst.id = upd.instrument_id
"""


# The claim and the write-back are the cycle's own bookkeeping: their commits need not wait for the
# WAL flush (an fsync: 0.07 to 0.7 ms each measured on this machine, 14 per 7-stage cycle). `set_config(..., true)` sets
# synchronous_commit=off for the statement's own transaction only, whenever it writes the row.
# Safe because every write that matters for money (the Order intent before the exchange call, the
# fills, the trade) stays synchronous, and a synchronous commit flushes all WAL before it: a
# bookkeeping write can only be lost in a PostgreSQL crash if nothing durable followed it, and then
# the redelivered stage runs again (stages are idempotent; an order is found by its cycle and its
# client order id). Visibility to other sessions is immediate either way.
_ASYNC_COMMIT = "set_config('synchronous_commit', 'off', true) IS NOT NULL"


@functools.cache
def _pg_claim_sql() -> str:
    qn = connection.ops.quote_name
    return _PG_CLAIM_SQL.format(
        async_commit=_ASYNC_COMMIT,
        cycle=qn(Cycle._meta.db_table), instrument=qn(Instrument._meta.db_table),
        cycle_cols=", ".join(f"upd.{qn(f.column)}" for f in Cycle._meta.concrete_fields),
        instrument_cols=", ".join(f"inst.{qn(f.column)}" for f in Instrument._meta.concrete_fields),
    )


def _from_db_values(model: type, values: list[object]) -> object:
    """A model instance from its concrete columns as the database gave them (the ORM's converters applied)."""
    fields = model._meta.concrete_fields
    converted = []
    for f, value in zip(fields, values, strict=True):
        for convert in f.get_db_converters(connection):  # e.g. JSONField decodes its text
            value = convert(value, f.get_col(model._meta.db_table), connection)
        converted.append(value)
    return model.from_db(connection.alias, [f.attname for f in fields], converted)


def _pg_lock_and_claim(*, cycle_id: int, stage: str, now: datetime) -> tuple[bool, Cycle | None]:
    """(lock won, the claimed cycle with its instrument or None when the UPDATE did not move it)."""
    entry = json.dumps({"started": now.isoformat(), "worker": worker_name()})
    # Counted as held until the answer says otherwise: session locks survive a failed statement, so if
    # this one fails after taking the lock, the task's end drops the session (db_task_boundary).
    _HELD.ids.add(cycle_id)
    with connection.cursor() as cur:
        cur.execute(_pg_claim_sql(), [
            _LOCK_NAMESPACE, _lock_key(cycle_id), stage, stage, entry, int(cycle_id), sorted(previous_states(stage)),
        ])
        row = list(cur.fetchone())
    held = bool(row[0])
    if not held:
        _HELD.ids.discard(cycle_id)
    n_cycle = len(Cycle._meta.concrete_fields)
    cycle_values, instrument_values = row[1:1 + n_cycle], row[1 + n_cycle:]
    if cycle_values[0] is None:  # no row came back: not claimed
        return held, None
    cycle = _from_db_values(Cycle, cycle_values)
    cycle.instrument = _from_db_values(Instrument, instrument_values)  # type: ignore[attr-defined]
    return held, cycle  # type: ignore[return-value]


@contextmanager
def stage_claim_locked(
    *, cycle_id: int, stage: str, resume_states: frozenset[str] | None = None
) -> Iterator[tuple[str, Cycle | None]]:
    """Take the cycle's lock and claim `stage`; the lock is held until the block ends.

    Yields (Claim.BUSY, None) when another worker holds the lock, else what
    `stage_claim` gives. On PostgreSQL the lock, the claim and the claimed row
    (with its instrument) are one statement; SQLite takes the file lock, then
    claims as `stage_claim` does.
    """
    if connection.vendor != "postgresql":
        with cycle_lock(cycle_id) as held:
            if not held:
                yield Claim.BUSY, None
                return
            yield stage_claim(cycle_id=cycle_id, stage=stage, resume_states=resume_states)
        return
    now = timezone.now()
    held, claimed = _pg_lock_and_claim(cycle_id=cycle_id, stage=stage, now=now)
    if not held:
        yield Claim.BUSY, None
        return
    try:
        if claimed is not None:
            result: tuple[str, Cycle | None] = (Claim.RUN, claimed)
        else:
            result = _claim_not_won(cycle_id=cycle_id, stage=stage, resume_states=resume_states, now=now)
        yield result
    finally:
        if cycle_id in _HELD.ids:  # not already released by the block's write-back (cycle_write_back)
            _pg_unlock(cycle_id)


# The write-back and the release of the cycle's lock in one round trip (PostgreSQL). The unlock is
# evaluated on the one row the aggregate over `upd` yields, so it runs after the UPDATE has written
# (and row-locked) its new version, whether or not the UPDATE matched; a data-modifying CTE always
# runs to completion. The lock is then free a moment before the statement commits: a duplicate
# that takes it then finds the claim's UPDATE blocked by the row lock until the commit, and a
# not-won claim reads the row FOR UPDATE (`_claim_not_won`), so nobody acts on the row as it was
# before the write-back.
_PG_WRITE_BACK_UNLOCK_SQL = """
WITH upd AS ({update} RETURNING 1)
SELECT w.n, pg_advisory_unlock(%s, %s) FROM (SELECT count(*) AS n FROM upd) AS w
"""


def cycle_write_back(*, cycle: Cycle, claimed_state: str, fields: list[str], release_lock: bool = False) -> bool:
    """UPDATE the named fields of a claimed cycle, only if it is still in `claimed_state`.

    What `Cycle.objects.filter(pk=..., state=claimed_state).update(...)` does,
    with the statement built here from the fields' own database preparation
    (`get_db_prep_save`, as Django's UPDATE compiler does): it runs once per
    stage, and the ORM's compilation was most of its cost. False when the cycle
    left `claimed_state` meanwhile (a stale sweep or an interrupt ended it).

    `release_lock`: on PostgreSQL, the same statement releases the cycle's
    advisory lock when this session holds it (the stage is over; saves the
    unlock's round trip; `stage_claim_locked` then has nothing left to
    release). Elsewhere the lock is released when the claim's block ends.
    """
    qn = connection.ops.quote_name
    sets, params = [], []
    for name in fields:
        f = Cycle._meta.get_field(name)
        value = f.get_db_prep_save(getattr(cycle, f.attname), connection)
        if value is None:
            sets.append(f"{qn(f.column)} = NULL")
        else:
            sets.append(f"{qn(f.column)} = %s")
            params.append(value)
    sql = f"UPDATE {qn(Cycle._meta.db_table)} SET {', '.join(sets)} WHERE {qn('id')} = %s AND {qn('state')} = %s"
    params += [cycle.pk, claimed_state]
    if connection.vendor != "postgresql":
        with connection.cursor() as cur:
            cur.execute(sql, params)
            return cur.rowcount > 0
    sql += f" AND {_ASYNC_COMMIT}"  # bookkeeping: see _ASYNC_COMMIT
    if not (release_lock and cycle.pk in _HELD.ids):
        with connection.cursor() as cur:
            cur.execute(sql, params)
            return cur.rowcount > 0
    with connection.cursor() as cur:
        cur.execute(_PG_WRITE_BACK_UNLOCK_SQL.format(update=sql), [*params, _LOCK_NAMESPACE, _lock_key(cycle.pk)])
        written = int(cur.fetchone()[0])
    # Only once the statement succeeded: a failed one may have left the lock held, and a lock still
    # listed at the task's end makes db_task_boundary drop the session, which frees it for sure.
    _HELD.ids.discard(cycle.pk)
    return written > 0


def stage_started(cycle: Cycle, stage: str, *, now: datetime | None = None) -> None:
    """In-memory start mark (replay: no claim, nothing else runs the cycle)."""
    transition_check(cycle.state, stage)
    cycle.state = stage
    # A plain str key (the stage may be a CycleState): orjson, which writes a replay's rows (journal.bulk),
    # refuses str-subclass keys, and every cycle's stage_times then went through the stdlib encoder.
    cycle.stage_times[str(stage)] = {"started": (now or timezone.now()).isoformat()}


def cycle_end(
    cycle: Cycle, *, outcome: str, reason: str, error: str = "", state: str = S.DONE, now: datetime | None = None
) -> None:
    """Mark the cycle ended (in memory; the caller persists it)."""
    transition_check(cycle.state, state)
    cycle.state = state
    cycle.outcome = outcome
    cycle.reason = redact(reason)[:4000]
    cycle.error = redact(error)[:8000]
    cycle.ended_at = now or timezone.now()


def cycle_interrupt_running(*, reason: str, mode: str = Mode.LIVE) -> list[int]:
    """Mark every unfinished cycle INTERRUPTED (runbot on Ctrl-C, after workers stopped)."""
    now = timezone.now()
    ids = list(Cycle.objects.filter(mode=mode, state__in=ACTIVE_STATES).values_list("id", flat=True))
    for cycle_id in ids:
        Cycle.objects.filter(pk=cycle_id, state__in=ACTIVE_STATES).update(
            state=S.INTERRUPTED, outcome=CycleOutcome.INTERRUPTED, ended_at=now, reason=reason
        )
    return ids
