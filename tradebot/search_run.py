"""Running a parameter search: trials on the reflection workers (or in this process), waiting, stopping, the candidate.

The command (`manage.py optimize`) is the study's coordinator while it runs: it holds a lease on the study row
(one coordinator at a time; a dead one's lease runs out), keeps `workers slots + 1` tickets in flight (one
waits in the queue so a worker that finishes starts the next at once), and watches the running ones: Optuna
fails a trial whose worker stopped writing heartbeats (SIGKILL, power loss) and its ticket is marked lost;
a new ticket replaces it, so the study reaches its number of finished trials with only that trial lost.
Without a reflection worker that answers the ping at the start (or with CELERY_TASK_ALWAYS_EAGER) the same
trial service runs in this process, one trial at a time. (A solo-pool worker busy with a long task, a
validation say, does not answer a ping: start the command when the workers are free, or add workers.)

Stopping (Ctrl-C): the queued tickets are cancelled (their tasks find them so and do nothing), the trials
running on workers finish there and are kept, one running here is marked interrupted; every finished trial
is kept in Optuna's study and in the rows, and the same command resumes the study.
"""
from __future__ import annotations

import copy
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import close_old_connections
from django.db.models import Count, Max, Q
from django.utils import timezone

from brain.models import PlaybookTrigger
from journal.services import event_record
from tradebot.logging import get_logger
from tradebot.models import FINISHED_TRIAL_STATES, SearchStudy, SearchStudyStatus, SearchTrial, SearchTrialState
from tradebot.search import Placement, SearchError, _optuna, search_storage, search_trial_run

log = get_logger(__name__)
S = SearchTrialState
TRIAL_TASK = "tradebot.tasks.reflection_search_trial"
POLL_SECONDS = 0.25
IDLE_WARNING_SECONDS = 120


def coordinator_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_seconds() -> int:
    """A coordinator silent this long is gone (its lease is refreshed every poll, and during a trial it runs)."""
    return max(60, 2 * settings.SEARCH_TRIAL_GRACE_SECONDS)


@dataclass
class Dispatch:
    """Where the trials run: on `workers` (names, `slots` processes in all) or in this process, and why."""

    workers: list[str] = field(default_factory=list)
    slots: int = 0
    why: str = ""

    @property
    def in_process(self) -> bool:
        return not self.workers

    def describe(self) -> str:
        if self.in_process:
            return f"trials run in this process: {self.why}"
        return (f"trials run on {len(self.workers)} reflection worker{'s' if len(self.workers) > 1 else ''} "
                f"({', '.join(self.workers)}; {self.slots} at a time)")


def reflection_workers(*, timeout: float | None = None) -> Dispatch:
    """Ask the broker which workers consume the reflection queue (and their pool size)."""
    from tradebot.celery import app

    timeout = settings.SEARCH_WORKER_PING_SECONDS if timeout is None else timeout
    if app.conf.task_always_eager:
        return Dispatch(why="CELERY_TASK_ALWAYS_EAGER is on")
    try:
        inspect = app.control.inspect(timeout=timeout)
        replies = inspect.active_queues() or {}
        names = sorted(n for n, queues in replies.items() if any(q.get("name") == "reflection" for q in queues or []))
        if not names:
            return Dispatch(why=f"no reflection worker answered within {timeout:g} s")
        stats = app.control.inspect(timeout=timeout, destination=names).stats() or {}
    except Exception as exc:  # noqa: BLE001 - a broker that cannot broadcast: no worker to count on
        return Dispatch(why=f"the broker did not answer a ping ({type(exc).__name__}: {exc})")
    slots = sum(max(1, int(((stats.get(n) or {}).get("pool") or {}).get("max-concurrency") or 1)) for n in names)
    return Dispatch(workers=names, slots=slots)


# --- the lease and the tickets -------------------------------------------------------------------------------------


def study_claim(*, study: SearchStudy, who: str) -> None:
    """Become the study's coordinator; SearchError when another live command is.

    What a dead coordinator left: its queued tickets are cancelled (no one will send them again; a task that
    still arrives finds them so), a trial it ran in its own process is interrupted (failed in Optuna too).
    """
    now = timezone.now()
    stale = now - timedelta(seconds=_lease_seconds())
    claimed = SearchStudy.objects.filter(pk=study.pk).filter(
        Q(coordinator="") | Q(coordinator=who) | Q(coordinator_seen_at__isnull=True) | Q(coordinator_seen_at__lt=stale)
    ).update(coordinator=who, coordinator_seen_at=now, status=SearchStudyStatus.RUNNING)
    if not claimed:
        study.refresh_from_db()
        age = (now - study.coordinator_seen_at).total_seconds() if study.coordinator_seen_at else 0
        raise SearchError(f"study {study.name} is being run by {study.coordinator} (seen {age:.0f} s ago); "
                          f"stop that command first")
    study.refresh_from_db()
    SearchTrial.objects.filter(study=study, state=S.QUEUED).update(
        state=S.CANCELLED, finished_at=now, reason="its command stopped before it ran")
    left = list(SearchTrial.objects.filter(study=study, state=S.RUNNING, dispatch="in-process"))
    for ticket in left:
        _interrupt(study, ticket, "its command stopped while it ran")


def _interrupt(study: SearchStudy, ticket: SearchTrial, reason: str) -> None:
    SearchTrial.objects.filter(pk=ticket.pk, state=S.RUNNING).update(
        state=S.INTERRUPTED, finished_at=timezone.now(), reason=reason)
    _optuna_fail(study, ticket.number)


def _optuna_fail(study: SearchStudy, number: int | None) -> None:
    """An interrupted trial is failed in Optuna too (when Ctrl-C left it running there); best effort."""
    if number is None:
        return
    optuna = _optuna()
    try:
        loaded = optuna.load_study(study_name=study.optuna_name, storage=search_storage(heartbeat=False))
        loaded.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    except Exception as exc:  # noqa: BLE001 - the next command's study_claim tries again; the rows say interrupted
        log.warning("search_trial_fail_not_told", study=study.name, number=number, error=str(exc)[:300])


def lease_refresh(study: SearchStudy, who: str) -> None:
    SearchStudy.objects.filter(pk=study.pk, coordinator=who).update(coordinator_seen_at=timezone.now())


def ticket_new(study: SearchStudy, *, dispatch: str) -> SearchTrial:
    seq = (SearchTrial.objects.filter(study=study).aggregate(m=Max("seq"))["m"] or 0) + 1
    return SearchTrial.objects.create(study=study, seq=seq, dispatch=dispatch)


def ticket_send(ticket: SearchTrial) -> None:
    from tradebot.celery import app

    app.signature(TRIAL_TASK, args=(ticket.pk,)).set(queue="reflection").apply_async()


@dataclass
class Progress:
    """Where the study stands, for the progress bar and the summary."""

    finished: int = 0
    target: int = 0
    counts: Counter = field(default_factory=Counter)
    best_value: float | None = None
    best_number: int | None = None

    @property
    def running(self) -> int:
        return self.counts[S.RUNNING]

    def text(self) -> str:
        best = "none yet" if self.best_value is None else f"{self.best_value:.5f} (trial {self.best_number})"
        parts = [f"best {best}", f"running {self.counts[S.RUNNING]}"]
        for state in (S.PRUNED, S.FAILED, S.LOST):
            if self.counts[state]:
                parts.append(f"{state} {self.counts[state]}")
        return ", ".join(parts)


def progress_read(study: SearchStudy) -> Progress:
    rows = SearchTrial.objects.filter(study=study).order_by().values_list("state").annotate(n=Count("id"))
    counts = Counter(dict(rows))
    best = (SearchTrial.objects.filter(study=study, state=S.COMPLETE).order_by("-value", "seq")
            .values_list("value", "number").first())
    return Progress(finished=sum(counts[s] for s in FINISHED_TRIAL_STATES), target=study.trials_target, counts=counts,
                    best_value=best[0] if best else None, best_number=best[1] if best else None)


def lost_check(study: SearchStudy, optuna_study: Any) -> None:
    """Trials whose worker died: Optuna fails those with a stale heartbeat (the callback marks their tickets
    lost); a ticket claimed but never given a trial number (its worker died in between) is lost after the grace."""
    from optuna.storages import fail_stale_trials

    fail_stale_trials(optuna_study)
    # Between its claim and its trial number a worker only asks Optuna for the trial (moments); generous all the same.
    grace = timezone.now() - timedelta(seconds=max(30, 3 * settings.SEARCH_TRIAL_GRACE_SECONDS))
    SearchTrial.objects.filter(study=study, state=S.RUNNING, dispatch="worker", number__isnull=True,
                               started_at__lt=grace).update(
        state=S.LOST, finished_at=timezone.now(), reason="its worker died before the trial started")
    # Optuna only fails a trial whose heartbeat went stale, never one that has none: a worker killed between
    # Optuna's ask() and its heartbeat thread's first write left a RUNNING trial that nothing failed, and the
    # command waited for it forever (seen once in the two-worker test). One with no heartbeat a grace after its
    # claim is failed here, as Optuna fails a stale one.
    silent = timezone.now() - timedelta(seconds=settings.SEARCH_TRIAL_GRACE_SECONDS + settings.SEARCH_HEARTBEAT_SECONDS)
    waiting = dict(SearchTrial.objects.filter(study=study, state=S.RUNNING, dispatch="worker", number__isnull=False,
                                              started_at__lt=silent).values_list("pk", "number"))
    if not waiting:
        return
    beating = _numbers_with_heartbeats(study, list(waiting.values()))  # one read per poll, not one per trial
    for pk, number in waiting.items():
        if number in beating:
            continue
        lost = SearchTrial.objects.filter(pk=pk, state=S.RUNNING).update(
            state=S.LOST, finished_at=timezone.now(),
            reason=f"no heartbeat for {settings.SEARCH_TRIAL_GRACE_SECONDS} s: its worker died before its first one")
        if lost:
            log.warning("search_trial_lost", study=study.name, number=number, heartbeat="never")
            _optuna_fail(study, number)


def _numbers_with_heartbeats(study: SearchStudy, numbers: list[int]) -> set[int]:
    """Which of the study's trial `numbers` Optuna's storage holds a heartbeat for. Its heartbeat table has no
    public reader: read through the storage's own engine (tables `trials`, `trial_heartbeats`)."""
    import sqlalchemy

    storage = search_storage(heartbeat=False)
    query = sqlalchemy.text(
        "SELECT t.number FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
        "WHERE t.study_id = :study AND t.number IN :numbers").bindparams(sqlalchemy.bindparam("numbers", expanding=True))
    with storage.engine.connect() as conn:
        return {int(n) for n in conn.execute(query, {"study": storage.get_study_id_from_name(study.optuna_name),
                                                     "numbers": numbers}).scalars()}


# --- the loop ------------------------------------------------------------------------------------------------------


def search_run(*, study: SearchStudy, dispatch: Dispatch, who: str,
               on_progress: Callable[[Progress], None] | None = None,
               on_note: Callable[[str], None] | None = None) -> Progress:
    """Run trials until the study has `trials_target` finished ones. KeyboardInterrupt propagates (see search_stop)."""
    note = on_note or (lambda _text: None)
    show = on_progress or (lambda _p: None)
    if dispatch.in_process:
        return _run_here(study=study, who=who, show=show)
    storage = search_storage(heartbeat=True)
    optuna_study = _optuna().load_study(study_name=study.optuna_name, storage=storage)
    window = dispatch.slots + 1
    idle_since: float | None = None
    warned = False
    while True:
        close_old_connections()
        lease_refresh(study, who)
        lost_check(study, optuna_study)
        progress = progress_read(study)
        show(progress)
        if progress.finished >= study.trials_target:
            return progress
        in_flight = progress.counts[S.QUEUED] + progress.counts[S.RUNNING]
        for _ in range(min(study.trials_target - progress.finished - in_flight, window - in_flight)):
            ticket_send(ticket_new(study, dispatch="worker"))
        # Tickets wait and nothing runs: the workers are busy with longer tasks (a solo worker running one does not
        # answer a ping either) or gone. Say so once; the trials run when a worker takes them, Ctrl-C keeps them.
        if progress.counts[S.QUEUED] and not progress.counts[S.RUNNING]:
            idle_since = idle_since or time.monotonic()
            if not warned and time.monotonic() - idle_since > IDLE_WARNING_SECONDS:
                note(f"{progress.counts[S.QUEUED]} trials have waited {IDLE_WARNING_SECONDS} s with none running: "
                     f"are the reflection workers busy or gone? Ctrl-C stops (the study resumes later)")
                warned = True
        else:
            idle_since = None
        time.sleep(POLL_SECONDS)


def _run_here(*, study: SearchStudy, who: str, show: Callable[[Progress], None]) -> Progress:
    worker = f"in-process:{who}"
    last = [time.monotonic()]

    def tick(_done: int, _total: int) -> None:  # between replay batches: keep the lease while a trial runs
        if time.monotonic() - last[0] > 5:
            lease_refresh(study, who)
            last[0] = time.monotonic()

    while True:
        lease_refresh(study, who)
        progress = progress_read(study)
        show(progress)
        if progress.finished >= study.trials_target:
            return progress
        ticket = ticket_new(study, dispatch="in-process")
        search_trial_run(ticket_id=ticket.pk, worker=worker, dispatch="in-process", tick=tick)


def search_stop(*, study: SearchStudy, who: str) -> dict[str, int]:
    """After Ctrl-C: cancel what is queued, let what runs on workers finish there, release the lease."""
    close_old_connections()
    now = timezone.now()
    cancelled = SearchTrial.objects.filter(study=study, state=S.QUEUED).update(
        state=S.CANCELLED, finished_at=now, reason="the command stopped (Ctrl-C) before it ran")
    for ticket in SearchTrial.objects.filter(study=study, state=S.RUNNING, dispatch="in-process"):
        _interrupt(study, ticket, "stopped by Ctrl-C: its replays are not scored")
    for number in SearchTrial.objects.filter(study=study, state=S.INTERRUPTED, dispatch="in-process",
                                             worker=f"in-process:{who}").values_list("number", flat=True):
        _optuna_fail(study, number)
    progress = progress_read(study)
    SearchStudy.objects.filter(pk=study.pk, coordinator=who).update(
        status=SearchStudyStatus.STOPPED, coordinator="", coordinator_seen_at=None,
        message=f"stopped (Ctrl-C) at {progress.finished} of {study.trials_target} finished trials")
    return {"finished": progress.finished, "running": progress.counts[S.RUNNING], "cancelled": cancelled}


# --- the result ----------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    best: SearchTrial | None
    baseline: float | None
    candidate_version: int | None
    message: str
    validation: str = ""  # the verdict when validated here, or where it was queued


def search_finish(*, study: SearchStudy, who: str, queue_validation: bool) -> SearchResult:
    """The best trial becomes a candidate (validated like every change: queued on the reflection queue, or by the
    caller with `search_validate`) when it beats the base version's own values on the training windows; the
    study is done and its lease released."""
    result = _result(study=study, queue_validation=queue_validation)
    SearchStudy.objects.filter(pk=study.pk).update(
        status=SearchStudyStatus.DONE, coordinator="", coordinator_seen_at=None, message=result.message,
        best_trial=result.best.number if result.best else None, best_value=result.best.value if result.best else None,
        best_params=result.best.params if result.best else None, baseline_value=result.baseline,
        **({"candidate_version": result.candidate_version} if result.candidate_version else {}))
    study.refresh_from_db()
    return result


def search_validate(*, version: int) -> str:
    """The normal out-of-sample validation of a search's candidate, in this process: its verdict in one line."""
    from brain.models import PlaybookVersion
    from tradebot.learning import playbook_candidate_validate

    candidate = PlaybookVersion.objects.get(version=version)
    outcome = playbook_candidate_validate(candidate_id=candidate.pk,
                                          cycle=timedelta(seconds=settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS))
    return f"validation: {outcome.verdict}: {outcome.reason}"


def _result(*, study: SearchStudy, queue_validation: bool) -> SearchResult:
    from brain.playbook import PlaybookError, playbook_candidate_propose, playbook_current

    complete = list(SearchTrial.objects.filter(study=study, state=S.COMPLETE).order_by("-value", "seq"))
    baseline_row = next((t for t in complete if (t.figures or {}).get("baseline")), None)
    baseline = baseline_row.value if baseline_row else None
    best = complete[0] if complete else None
    if best is None:
        return SearchResult(None, baseline, None, "no trial completed (pruned or failed, see the trials): no candidate")
    if baseline is not None and best.value is not None and best.value <= baseline:
        return SearchResult(best, baseline, None, f"no trial beat the base version's own values "
                            f"({baseline:.5f}) on the training windows: no candidate")
    if study.candidate_version and study.best_trial == best.number:
        return SearchResult(best, baseline, study.candidate_version, f"trial {best.number} is still the best: "
                            f"its candidate is playbook v{study.candidate_version}")
    current = playbook_current()
    if study.strategy not in current.playbook["strategy_definitions"]:
        return SearchResult(best, baseline, None, f"strategy {study.strategy} is not in the active v{current.version} "
                            f"any more: no candidate")
    # The active version as it is now, with the searched parameters of the best trial: nothing else changes.
    data = copy.deepcopy(current.playbook)
    data["strategy_definitions"][study.strategy]["params"].update(best.params or {})
    placement = Placement.from_json(study.training)
    score = f"objective {best.value:.5f} on the training windows" + (
        f" (base version's values: {baseline:.5f})" if baseline is not None else "")
    summary = f"parameter search {study.name}: trial {best.number} of {study.strategy}, {score}"
    reasons = {f"strategy_definitions.{study.strategy}.params.{k}": summary for k in best.params or {}}
    # The evidence window is the training span: the validation's folds never overlap it (tradebot.learning).
    evidence = {"from": placement.windows[0][0].isoformat(), "to": placement.windows[-1][1].isoformat(),
                "trade_ids": [], "search": {"study": study.name, "trial": best.number, "value": best.value,
                                            "baseline": baseline, "run_ids": best.run_ids,
                                            "windows": study.training["windows"]}}
    try:
        candidate = playbook_candidate_propose(data=data, triggered_by=PlaybookTrigger.SEARCH, change_summary=summary,
                                               reasons=reasons, evidence=evidence, queue_validation=queue_validation)
    except PlaybookError as exc:
        return SearchResult(best, baseline, None, f"no candidate: {exc}")
    event_record(kind="playbook_search_candidate", message=f"playbook v{candidate.version} (candidate) from {summary}",
                 data={"version": candidate.version, "study": study.name, "trial": best.number, "value": best.value})
    message = f"candidate playbook v{candidate.version} (not active: it trades only if validation promotes it)"
    queued = (f"its validation is queued on the reflection queue (see `playbook show {candidate.version}`)"
              if queue_validation else "")
    return SearchResult(best, baseline, candidate.version, message, validation=queued)
