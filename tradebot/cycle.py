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
older than `CYCLE_STALE_SECONDS` is marked INTERRUPTED so it cannot block the
instrument forever.
"""
from __future__ import annotations

import fcntl
import os
import socket
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


def cycle_open(
    *,
    instrument: Instrument,
    as_of: datetime,
    mode: str = Mode.LIVE,
    run_id: str = "",
    trigger: str = "beat",
    now: datetime | None = None,
) -> Cycle:
    """Create the next cycle for an instrument, or a SKIPPED one when the previous still runs.

    The instrument row is locked for the check-and-create so two beat ticks
    (or a tick and `bot run-cycle`) cannot both start a cycle.
    """
    now = now or timezone.now()
    stale_after = timedelta(seconds=settings.CYCLE_STALE_SECONDS)
    with transaction.atomic():
        Instrument.objects.select_for_update().filter(pk=instrument.pk).first()
        running = list(
            Cycle.objects.filter(instrument=instrument, mode=mode, run_id=run_id, state__in=ACTIVE_STATES).order_by("id")
        )
        blocking: Cycle | None = None
        for cycle in running:
            age = (now - cycle.started_at).total_seconds()
            if age > stale_after.total_seconds():
                # Far past every time limit: its worker is gone. Free the instrument.
                Cycle.objects.filter(pk=cycle.pk, state=cycle.state).update(
                    state=S.INTERRUPTED,
                    outcome=CycleOutcome.INTERRUPTED,
                    ended_at=now,
                    reason=f"stale: still {cycle.state} after {age:.0f}s (limit {stale_after.total_seconds():.0f}s)",
                )
                log.warning("cycle_stale_interrupted", cycle_id=cycle.pk, state=cycle.state, age_s=round(age))
            else:
                blocking = cycle
        times = {"trigger": trigger}
        if blocking is not None:
            reason = (
                f"previous cycle {blocking.pk} still {blocking.state} "
                f"(started {(now - blocking.started_at).total_seconds():.0f}s ago)"
            )
            skipped = Cycle.objects.create(
                instrument=instrument, mode=mode, run_id=run_id, as_of=as_of, state=S.SKIPPED,
                outcome=CycleOutcome.SKIPPED, reason=reason, ended_at=now, stage_times=times,
            )
            log.info("cycle_skipped", cycle_id=skipped.pk, inst_id=instrument.inst_id, blocking=blocking.pk)
            return skipped
        return Cycle.objects.create(
            instrument=instrument, mode=mode, run_id=run_id, as_of=as_of, state=S.IDLE, stage_times=times
        )


# --- the per-cycle lock ---------------------------------------------------------

_LOCK_NAMESPACE = 0x7B07  # keeps our advisory keys apart from anyone else's on the server


@contextmanager
def cycle_lock(cycle_id: int) -> Iterator[bool]:
    """Try to take the cycle's lock without waiting; yields whether we hold it.

    PostgreSQL: a session advisory lock (several machines, one database).
    SQLite: an flock on a file under VAR_DIR (one machine). Both are released
    by the operating system or the server when the holder dies.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", [_LOCK_NAMESPACE, int(cycle_id) & 0x7FFFFFFF])
            got = bool(cur.fetchone()[0])
        try:
            yield got
        finally:
            if got:
                with connection.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s, %s)", [_LOCK_NAMESPACE, int(cycle_id) & 0x7FFFFFFF])
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
    STOP = "stop"  # someone else has it, or the cycle moved on or ended


def stage_claim(*, cycle_id: int, stage: str, resume_states: frozenset[str] | None = None) -> tuple[str, Cycle | None]:
    """Claim `stage` for a cycle; the caller must hold `cycle_lock(cycle_id)`.

    `resume_states`: states in which this stage's task was already running or
    done (e.g. EXECUTING and CONFIRMING for the execute task). Found there with
    the lock free, its worker died: RUN again if the stage did not finish
    (stages are idempotent), CONTINUE if it did.
    """
    now = timezone.now()
    claimed = Cycle.objects.filter(pk=cycle_id, state__in=previous_states(stage)).update(state=stage)
    cycle = Cycle.objects.filter(pk=cycle_id).select_related("instrument").first()
    if cycle is None:
        return Claim.STOP, None
    if claimed:
        cycle.stage_times[stage] = {"started": now.isoformat(), "worker": worker_name()}
        Cycle.objects.filter(pk=cycle_id).update(stage_times=cycle.stage_times)
        return Claim.RUN, cycle
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


def stage_started(cycle: Cycle, stage: str, *, now: datetime | None = None) -> None:
    """In-memory start mark (replay: no claim, nothing else runs the cycle)."""
    transition_check(cycle.state, stage)
    cycle.state = stage
    cycle.stage_times[stage] = {"started": (now or timezone.now()).isoformat()}


def stage_finished(cycle: Cycle, stage: str, *, started_monotonic: float, finished_monotonic: float) -> None:
    entry = cycle.stage_times.setdefault(stage, {})
    entry["duration_ms"] = round((finished_monotonic - started_monotonic) * 1000, 3)
    entry["done"] = True


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
