"""Cycle mechanics: one cycle per instrument, conditional claims, the lock, stale cycles."""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from journal.models import Cycle, CycleOutcome, CycleState
from market.models import Instrument
from tradebot.cycle import (
    Claim,
    TransitionError,
    cycle_end,
    cycle_interrupt_running,
    cycle_lock,
    cycle_open,
    previous_states,
    stage_claim,
    transition_check,
)

S = CycleState
AS_OF = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def btc(db) -> Instrument:
    return Instrument.objects.create(
        inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


def test_the_transition_table_follows_the_pipeline_and_refuses_shortcuts() -> None:
    transition_check(S.SCREENING, S.ANALYZING)  # research is optional
    transition_check(S.EXECUTING, S.DONE)
    with pytest.raises(TransitionError):
        transition_check(S.SCREENING, S.EXECUTING)
    with pytest.raises(TransitionError):
        transition_check(S.DONE, S.COLLECTING)
    assert previous_states(S.ANALYZING) == {S.SCREENING, S.RESEARCHING}


def test_a_tick_while_the_previous_cycle_runs_records_a_skipped_cycle(btc: Instrument) -> None:
    first = cycle_open(instrument=btc, as_of=AS_OF)
    assert first.state == S.IDLE
    second = cycle_open(instrument=btc, as_of=AS_OF + timedelta(minutes=5))
    assert second.state == S.SKIPPED and second.outcome == CycleOutcome.SKIPPED
    assert f"previous cycle {first.pk} still IDLE" in second.reason
    assert second.ended_at is not None
    # Replay runs do not block the live bot, and the other way round.
    replay = cycle_open(instrument=btc, as_of=AS_OF, mode="replay", run_id="r1")
    assert replay.state == S.IDLE


def test_a_cycle_running_past_its_limits_is_interrupted_and_frees_the_instrument(btc: Instrument, settings) -> None:
    settings.CELERY_TASK_TIME_LIMIT = 50
    settings.CYCLE_STAGE_GRACE_SECONDS = 10
    stuck = cycle_open(instrument=btc, as_of=AS_OF)
    Cycle.objects.filter(pk=stuck.pk).update(state=S.EXECUTING, started_at=timezone.now() - timedelta(seconds=61))
    nxt = cycle_open(instrument=btc, as_of=AS_OF + timedelta(minutes=5))
    assert nxt.state == S.IDLE
    stuck.refresh_from_db()
    assert stuck.state == S.INTERRUPTED and stuck.outcome == CycleOutcome.INTERRUPTED
    assert "stale" in stuck.reason


def test_a_stage_claims_once_and_a_duplicate_claim_does_nothing(btc: Instrument) -> None:
    cycle = cycle_open(instrument=btc, as_of=AS_OF)
    with cycle_lock(cycle.pk) as held:
        assert held
        claim, row = stage_claim(cycle_id=cycle.pk, stage=S.COLLECTING)
        assert claim == Claim.RUN and row.state == S.COLLECTING
        assert "started" in row.stage_times[S.COLLECTING]
        # The next stage cannot be claimed from the wrong state.
        claim, _ = stage_claim(cycle_id=cycle.pk, stage=S.ANALYZING)
        assert claim == Claim.STOP
    Cycle.objects.filter(pk=cycle.pk).update(state=S.SCREENING)
    with cycle_lock(cycle.pk):
        claim, _ = stage_claim(cycle_id=cycle.pk, stage=S.COLLECTING)
    assert claim == Claim.STOP


def test_the_lock_is_exclusive_while_held() -> None:
    with cycle_lock(999_001) as first:
        assert first
        with cycle_lock(999_001) as second:
            assert not second
    with cycle_lock(999_001) as again:
        assert again


def test_a_stage_found_running_with_its_lock_free_resumes_and_a_finished_one_continues(btc: Instrument) -> None:
    cycle = cycle_open(instrument=btc, as_of=AS_OF)
    Cycle.objects.filter(pk=cycle.pk).update(state=S.EXECUTING, stage_times={S.EXECUTING: {"started": "x"}})
    with cycle_lock(cycle.pk):
        claim, row = stage_claim(cycle_id=cycle.pk, stage=S.EXECUTING, resume_states=frozenset({S.EXECUTING, S.CONFIRMING}))
    assert claim == Claim.RUN and row.stage_times[S.EXECUTING]["attempts"] == 2
    Cycle.objects.filter(pk=cycle.pk).update(state=S.CONFIRMING, stage_times={S.EXECUTING: {"done": True}})
    with cycle_lock(cycle.pk):
        claim, _ = stage_claim(cycle_id=cycle.pk, stage=S.EXECUTING, resume_states=frozenset({S.EXECUTING, S.CONFIRMING}))
    assert claim == Claim.CONTINUE


def test_ending_a_cycle_keeps_the_outcome_and_redacts_the_reason(btc: Instrument, settings, monkeypatch) -> None:
    monkeypatch.setenv("OKX_API_SECRET", "s3cr3t-value-123")
    cycle = cycle_open(instrument=btc, as_of=AS_OF)
    cycle.state = S.ANALYZING
    cycle_end(cycle, outcome=CycleOutcome.HOLD, reason="HOLD: key s3cr3t-value-123 leaked")
    assert cycle.state == S.DONE and cycle.outcome == CycleOutcome.HOLD
    assert "s3cr3t-value-123" not in cycle.reason


def test_interrupting_marks_only_unfinished_cycles(btc: Instrument) -> None:
    running = cycle_open(instrument=btc, as_of=AS_OF)
    done = Cycle.objects.create(instrument=btc, as_of=AS_OF, state=S.DONE, outcome=CycleOutcome.HOLD)
    assert cycle_interrupt_running(reason="Ctrl-C") == [running.pk]
    running.refresh_from_db()
    done.refresh_from_db()
    assert running.state == S.INTERRUPTED and done.state == S.DONE


def test_the_combined_lock_and_claim_is_busy_while_another_holder_has_the_lock(btc: Instrument) -> None:
    from tradebot.cycle import stage_claim_locked

    cycle = cycle_open(instrument=btc, as_of=AS_OF)
    with cycle_lock(cycle.pk) as held:  # another worker, mid-stage
        assert held
        with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
            assert claim == Claim.BUSY and row is None
    cycle.refresh_from_db()
    assert cycle.state == S.IDLE and S.COLLECTING not in cycle.stage_times
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
        assert claim == Claim.RUN and row.state == S.COLLECTING
        with cycle_lock(cycle.pk) as second:  # held for the whole block
            assert not second
    with cycle_lock(cycle.pk) as again:  # and released after it
        assert again


def test_a_write_back_lands_only_while_the_cycle_is_still_in_the_claimed_state(btc: Instrument) -> None:
    from tradebot.cycle import cycle_write_back

    cycle = cycle_open(instrument=btc, as_of=AS_OF)
    Cycle.objects.filter(pk=cycle.pk).update(state=S.ANALYZING)
    cycle.state = S.ANALYZING
    cycle.decision = {"action": "HOLD"}
    cycle_end(cycle, outcome=CycleOutcome.HOLD, reason="HOLD: flat market")
    # A stale sweep ended it meanwhile: nothing is written.
    Cycle.objects.filter(pk=cycle.pk).update(state=S.INTERRUPTED, reason="stale")
    assert not cycle_write_back(cycle=cycle, claimed_state=S.ANALYZING, fields=["state", "outcome", "reason", "decision"])
    row = Cycle.objects.get(pk=cycle.pk)
    assert row.state == S.INTERRUPTED and row.reason == "stale" and row.decision is None
    # Still in the claimed state: every named field is written, None as NULL.
    Cycle.objects.filter(pk=cycle.pk).update(state=S.ANALYZING)
    cycle.error = ""
    cycle.research = None
    assert cycle_write_back(cycle=cycle, claimed_state=S.ANALYZING,
                            fields=["state", "outcome", "reason", "decision", "ended_at", "research"])
    row = Cycle.objects.get(pk=cycle.pk)
    assert (row.state, row.outcome, row.decision, row.research) == (S.DONE, CycleOutcome.HOLD, {"action": "HOLD"}, None)
    assert row.ended_at == cycle.ended_at and row.reason == "HOLD: flat market"


def test_analyzing_reuses_the_context_screening_built_in_this_process_only_while_it_is_fresh(
    db, settings, monkeypatch,  # noqa: ANN001
) -> None:
    """As the replay does (one CycleWork per cycle): one context per cycle, not one per brain stage."""
    import tradebot.stages as stages
    import tradebot.tasks as stage_tasks
    from market.feeds.synthetic import SyntheticFeed
    from market.services import instruments_sync
    from tradebot.celery import app
    from tradebot.pipeline import STAGE_TASK_NAMES
    from tradebot.stages import STAGES, StageEnv

    settings.BRAIN = "rules"
    day = datetime(2025, 9, 5, tzinfo=UTC)  # seed 7: an OPEN_LONG at 00:30 and 00:40 (test_pipeline_workers.py)
    feed = SyntheticFeed(seed=7)
    instruments_sync(feed=feed, enable=["BTC-USDT-SWAP"])
    btc = Instrument.objects.get(inst_id="BTC-USDT-SWAP")
    reads: list[int] = []
    real_recent_trades = stages.recent_trades
    monkeypatch.setattr(stages, "recent_trades", lambda **kw: reads.append(1) or real_recent_trades(**kw))
    stage_tasks._ENV = StageEnv(feed=feed, exchange=None)  # noqa: SLF001

    def run_to_analyzing(as_of: datetime) -> Cycle:
        cycle = cycle_open(instrument=btc, as_of=as_of, trigger="test")
        for stage, _, _ in STAGES[:4]:
            app.tasks[STAGE_TASK_NAMES[stage]].apply(args=(cycle.pk,)).get()
        cycle.refresh_from_db()
        Cycle.objects.filter(pk=cycle.pk).update(state=S.DONE)  # the next cycle may open
        return cycle

    try:
        first = run_to_analyzing(day + timedelta(minutes=30))
        assert first.decision["decision"]["action"] == "OPEN_LONG" and len(reads) == 1  # screening read; analyzing reused
        key = stage_tasks._context_key(first)  # noqa: SLF001
        assert key is not None and key not in stage_tasks._CONTEXTS  # taken, not left behind  # noqa: SLF001
        # Past the reuse window the analyst's context is read afresh.
        monkeypatch.setattr(stage_tasks, "CONTEXT_REUSE_SECONDS", -1.0)
        run_to_analyzing(day + timedelta(minutes=40))
        assert len(reads) == 3
    finally:
        stage_tasks.env_reset()
        stage_tasks._CONTEXTS.clear()  # noqa: SLF001
    # Another cycle's (or another screening run's) context is never taken: the key is (cycle, start mark).
    other = Cycle(pk=first.pk, stage_times={S.SCREENING: {"started": "another run"}})
    assert stage_tasks._context_key(other) != key  # noqa: SLF001


def test_a_cycle_reads_the_playbook_once_and_writes_the_screener_feedback_blind(
    db, settings,  # noqa: ANN001
) -> None:
    """SCREENING builds the brain (the playbook read); ANALYZING reuses it. The news calendar is asked by
    SCREENING's bypass rule and RESEARCHING's trigger, once each (an edit in the admin counts at once)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    import tradebot.tasks as stage_tasks
    from brain.playbook import playbook_current
    from journal.models import ScreenerLog
    from market.feeds.synthetic import SyntheticFeed
    from market.services import instruments_sync
    from tradebot.celery import app
    from tradebot.pipeline import STAGE_TASK_NAMES
    from tradebot.stages import STAGES, StageEnv

    settings.BRAIN = "rules"
    feed = SyntheticFeed(seed=7)
    instruments_sync(feed=feed, enable=["BTC-USDT-SWAP"])
    btc = Instrument.objects.get(inst_id="BTC-USDT-SWAP")
    stage_tasks._ENV = StageEnv(feed=feed, exchange=None)  # noqa: SLF001
    playbook_current()  # v1, as a running bot has it (creating it reads the table more than once)
    cycle = cycle_open(instrument=btc, as_of=datetime(2025, 9, 5, 0, 30, tzinfo=UTC), trigger="test")  # an OPEN_LONG
    try:
        with CaptureQueriesContext(connection) as queries:
            for stage, _, _ in STAGES[:4]:  # COLLECTING .. ANALYZING
                app.tasks[STAGE_TASK_NAMES[stage]].apply(args=(cycle.pk,)).get()
    finally:
        stage_tasks.env_reset()
        stage_tasks._CONTEXTS.clear()  # noqa: SLF001
    cycle.refresh_from_db()
    assert cycle.decision["decision"]["action"] == "OPEN_LONG" and cycle.playbook_version == 1
    reads = [q["sql"] for q in queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert sum("brain_playbookversion" in q for q in reads) == 1
    assert sum("brain_newsevent" in q for q in reads) == 2
    assert not any("journal_screenerlog" in q for q in reads)
    row = ScreenerLog.objects.get(cycle=cycle)
    assert (row.analyst_action, row.analyst_agreed) == ("OPEN_LONG", True)


# --- PostgreSQL: the one-statement lock and claim, the session between tasks, queries per stage ---------


@pytest.fixture
def btc_tx(transactional_db) -> Instrument:  # noqa: ANN001
    return Instrument.objects.create(
        inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


def _other_session():  # noqa: ANN202 - a psycopg connection to the test database, not Django's
    import psycopg
    from django.db import connection

    s = connection.settings_dict
    return psycopg.connect(host=s["HOST"] or "127.0.0.1", port=s["PORT"] or 5432, user=s["USER"] or "postgres",
                           password=s["PASSWORD"] or None, dbname=s["NAME"], autocommit=True)


def _other_takes_lock(other, cycle_id: int) -> bool:  # noqa: ANN001
    from tradebot.cycle import _LOCK_NAMESPACE

    return bool(other.execute("SELECT pg_try_advisory_lock(%s, %s)", [_LOCK_NAMESPACE, cycle_id]).fetchone()[0])


@pytest.mark.postgres
def test_on_postgresql_lock_claim_and_row_are_one_statement_and_the_lock_excludes_other_sessions(btc_tx: Instrument) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tradebot.cycle import stage_claim_locked

    cycle = cycle_open(instrument=btc_tx, as_of=AS_OF)
    with _other_session() as other:
        with CaptureQueriesContext(connection) as queries:
            with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
                assert len(queries) == 1
                assert claim == Claim.RUN
                assert not _other_takes_lock(other, cycle.pk)
                fresh = Cycle.objects.select_related("instrument").get(pk=cycle.pk)
                for f in Cycle._meta.concrete_fields:  # the row the claim returned is the row as stored
                    assert getattr(row, f.attname) == getattr(fresh, f.attname), f.name
                for f in Instrument._meta.concrete_fields:
                    assert getattr(row.instrument, f.attname) == getattr(fresh.instrument, f.attname), f.name
                assert row.state == S.COLLECTING and "started" in row.stage_times[S.COLLECTING]
                assert row.stage_times["trigger"] == "beat"  # the start mark is merged, not a replacement
        assert _other_takes_lock(other, cycle.pk)  # released at the end of the block
        # Another session holds it now: the claim is BUSY and the UPDATE never ran.
        with stage_claim_locked(cycle_id=cycle.pk, stage=S.SCREENING) as (claim, row):
            assert claim == Claim.BUSY and row is None
        assert Cycle.objects.get(pk=cycle.pk).state == S.COLLECTING
        other.execute("SELECT pg_advisory_unlock_all()")


@pytest.mark.postgres
def test_on_postgresql_a_duplicate_claim_resumes_a_dead_stage_continues_a_finished_one_and_stops_otherwise(
    btc_tx: Instrument,
) -> None:
    from tradebot.cycle import stage_claim_locked

    cycle = cycle_open(instrument=btc_tx, as_of=AS_OF)
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, _):
        assert claim == Claim.RUN
    # The same stage again with the lock free and no "done": its worker died, so it runs again.
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
        assert claim == Claim.RUN and row.stage_times[S.COLLECTING]["attempts"] == 2
    Cycle.objects.filter(pk=cycle.pk).update(stage_times={S.COLLECTING: {"done": True}})
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, _):
        assert claim == Claim.CONTINUE
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.ANALYZING) as (claim, _):  # not from COLLECTING
        assert claim == Claim.STOP
    assert Cycle.objects.get(pk=cycle.pk).state == S.COLLECTING
    with stage_claim_locked(cycle_id=999_999_001, stage=S.COLLECTING) as (claim, row):  # no such cycle
        assert claim == Claim.STOP and row is None


@pytest.mark.postgres
def test_on_postgresql_the_bookkeeping_commits_never_leave_the_session_asynchronous(btc_tx: Instrument) -> None:
    """The claim and the write-back commit without waiting for the WAL flush; nothing after them may.

    The Order intent is written on the same connection right after: it must be a synchronous commit.
    """
    from django.db import connection

    from tradebot.cycle import cycle_write_back, stage_claim_locked

    def synchronous_commit() -> str:
        with connection.cursor() as cur:
            cur.execute("SHOW synchronous_commit")
            return cur.fetchone()[0]

    cycle = cycle_open(instrument=btc_tx, as_of=AS_OF)
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
        assert claim == Claim.RUN
        assert synchronous_commit() == "on"
        row.snapshot = {"price": "1"}
        assert cycle_write_back(cycle=row, claimed_state=S.COLLECTING, fields=["snapshot", "stage_times"])
        assert synchronous_commit() == "on"
    assert Cycle.objects.get(pk=cycle.pk).snapshot == {"price": "1"}


@pytest.mark.postgres
def test_on_postgresql_the_write_back_releases_the_lock_in_the_same_statement_written_or_not(btc_tx: Instrument) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from tradebot.cycle import cycle_locks_held, cycle_write_back, stage_claim_locked

    cycle = cycle_open(instrument=btc_tx, as_of=AS_OF)
    with _other_session() as other:
        with CaptureQueriesContext(connection) as queries:
            with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
                assert claim == Claim.RUN and not _other_takes_lock(other, cycle.pk)
                row.snapshot = {"price": "1"}
                assert cycle_write_back(cycle=row, claimed_state=S.COLLECTING, fields=["snapshot"], release_lock=True)
                assert cycle_locks_held() == frozenset()
                assert _other_takes_lock(other, cycle.pk)  # free right after the write-back, inside the block
                other.execute("SELECT pg_advisory_unlock_all()")
        assert len(queries) == 2  # the claim, the write-back with the unlock: no separate unlock at the block's end
        assert Cycle.objects.get(pk=cycle.pk).snapshot == {"price": "1"}
        # Not written (the cycle left the claimed state meanwhile): the lock is released all the same.
        with stage_claim_locked(cycle_id=cycle.pk, stage=S.SCREENING) as (claim, row):
            assert claim == Claim.RUN
            Cycle.objects.filter(pk=cycle.pk).update(state=S.INTERRUPTED)
            assert not cycle_write_back(cycle=row, claimed_state=S.SCREENING, fields=["state"], release_lock=True)
            assert cycle_locks_held() == frozenset() and _other_takes_lock(other, cycle.pk)
        other.execute("SELECT pg_advisory_unlock_all()")
    assert Cycle.objects.get(pk=cycle.pk).state == S.INTERRUPTED


@pytest.mark.postgres
def test_on_postgresql_a_duplicate_arriving_while_a_write_back_commits_continues_instead_of_running_again(
    btc_tx: Instrument,
) -> None:
    """The lock is released a moment before the write-back commits: a duplicate in that moment must see the commit.

    Another session plays the first delivery's write-back, its stage marked done, not yet committed
    (and the lock already free). The duplicate's claim must wait for it and CONTINUE; reading the
    row as it was before (stage not done) would RUN the stage a second time.
    """
    import threading

    from tradebot.cycle import stage_claim_locked

    cycle = cycle_open(instrument=btc_tx, as_of=AS_OF)
    with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, _):
        assert claim == Claim.RUN
    with _other_session() as other:
        other.autocommit = False
        other.execute(
            "UPDATE journal_cycle SET stage_times = jsonb_set(stage_times, '{COLLECTING,done}', 'true') WHERE id = %s",
            [cycle.pk],
        )
        committer = threading.Timer(0.3, other.commit)
        committer.start()
        try:
            with stage_claim_locked(cycle_id=cycle.pk, stage=S.COLLECTING) as (claim, row):
                assert claim == Claim.CONTINUE, row.stage_times
        finally:
            committer.join()
    stored = Cycle.objects.get(pk=cycle.pk).stage_times[S.COLLECTING]
    assert stored.get("done") is True and "attempts" not in stored


@pytest.mark.postgres
def test_between_tasks_a_healthy_connection_is_kept_and_a_leaked_cycle_lock_drops_the_session(btc_tx: Instrument) -> None:
    from django.db import connection

    from tradebot.cycle import _HELD, _LOCK_NAMESPACE, cycle_locks_held
    from tradebot.tasks import db_task_boundary

    def backend_pid() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    pid = backend_pid()
    db_task_boundary(task=None)
    assert backend_pid() == pid  # reused: no new session per task

    cycle = cycle_open(instrument=btc_tx, as_of=AS_OF)
    with connection.cursor() as cur:  # a lock whose release failed
        cur.execute("SELECT pg_try_advisory_lock(%s, %s)", [_LOCK_NAMESPACE, cycle.pk])
    _HELD.ids.add(cycle.pk)
    with _other_session() as other:
        assert not _other_takes_lock(other, cycle.pk)
        db_task_boundary(task=None)
        assert cycle_locks_held() == frozenset()
        # The closed session frees it: the server ends a backend a moment after the client closes.
        deadline = time.monotonic() + 5
        while not _other_takes_lock(other, cycle.pk):
            assert time.monotonic() < deadline, "the leaked lock was still held 5 s after its session closed"
            time.sleep(0.01)
        other.execute("SELECT pg_advisory_unlock_all()")
    assert backend_pid() != pid


@pytest.mark.postgres
def test_between_tasks_the_health_check_needs_no_select_1_and_a_session_the_server_ended_is_replaced(
    btc_tx: Instrument, monkeypatch,  # noqa: ANN001
) -> None:
    import time

    from django.db import connection

    from tradebot.tasks import _session_ended_by_server, db_task_boundary

    def backend_pid() -> int:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    assert connection.settings_dict["CONN_HEALTH_CHECKS"]  # the web and commands keep Django's own check
    pid = backend_pid()
    checks: list[int] = []
    real_is_usable = connection.is_usable
    monkeypatch.setattr(connection, "is_usable", lambda: checks.append(1) or real_is_usable())
    db_task_boundary(task=None)
    assert backend_pid() == pid and checks == []  # kept, checked without Django's SELECT 1
    # The server ends the session while the worker is idle (a PostgreSQL restart looks the same to the client).
    with _other_session() as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 5
    while not _session_ended_by_server(connection.connection):
        assert time.monotonic() < deadline, "the server's goodbye never arrived"
        time.sleep(0.01)
    db_task_boundary(task=None)
    assert backend_pid() != pid  # the next task's first query runs on a new session instead of failing


# Round trips per stage of a traded cycle on PostgreSQL (rules brain, paper exchange, nothing open before),
# BEGIN and COMMIT included (each is one). Every stage: the lock+claim+row statement, the write-back (which
# releases the lock in the same statement); the exchange handle's account row where the stage touches the book. On top:
# COLLECTING: the candle upsert (one statement for the three timeframes), the instrument spec, the tick
#   (BEGIN, account lock, positions, price, COMMIT);
# SCREENING: recent trades, positions, cash+resting orders, bot state, playbook, news, the screener log;
# RESEARCHING: nothing (SCREENING's news answer, kept in this process); ANALYZING: the screener log's
#   feedback (one UPDATE by its id) (the brain and its context are SCREENING's, kept in this process);
# RISK_CHECK: bot state, positions, cash+orders;
# EXECUTING: the cycle's order, bot state, positions, cash+orders, the Order intent, spec, the placement
#   (BEGIN, account lock, orders, price, positions, position/account/order/fill writes, COMMIT), the settle
#   (BEGIN, lock, write, COMMIT), instrument, trades, the trade; JOURNALING: the trade's cycle link.
# Counted the same way at 74d1fff: 27/17/8/17/19/48/8 (144); at 60a57a9: 19/11/4/6/7/27/4 (78); at aa3168f 67;
# now 10/10/3/3/6/25/3 (60: the unlock folded into the write-back).
# A worker adds no health-check SELECT 1 per task (tradebot.tasks.db_task_boundary checks the socket).
STAGE_ROUND_TRIP_CEILING = {S.COLLECTING: 10, S.SCREENING: 10, S.RESEARCHING: 3, S.ANALYZING: 3, S.RISK_CHECK: 6,
                            S.EXECUTING: 25, S.JOURNALING: 3}


@pytest.mark.postgres
def test_on_postgresql_a_traded_cycle_stays_within_its_round_trips_per_stage(transactional_db, settings) -> None:  # noqa: ANN001
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    import tradebot.tasks as stage_tasks
    from market.feeds.synthetic import SyntheticFeed
    from market.services import instruments_sync
    from tradebot.celery import app
    from tradebot.pipeline import STAGE_TASK_NAMES
    from tradebot.stages import STAGES, StageEnv

    settings.BRAIN = "rules"
    day = datetime(2025, 9, 5, tzinfo=UTC)  # seed 7: an OPEN_LONG at 00:30 (tests/tradebot/test_pipeline_workers.py)
    feed = SyntheticFeed(seed=7)  # what the workers' MARKET_DATA_SOURCE=synthetic builds
    instruments_sync(feed=feed, enable=["BTC-USDT-SWAP"])
    btc = Instrument.objects.get(inst_id="BTC-USDT-SWAP")
    stage_tasks._ENV = StageEnv(feed=feed, exchange=None)  # noqa: SLF001 - what a worker builds once
    def run(as_of: datetime) -> tuple[Cycle, dict[str, int]]:
        cycle = cycle_open(instrument=btc, as_of=as_of, trigger="test")
        counts = {}
        for stage, _, _ in STAGES:
            with CaptureQueriesContext(connection) as queries:
                going_on = app.tasks[STAGE_TASK_NAMES[stage]].apply(args=(cycle.pk,)).get() is not None
            counts[stage] = len(queries)
            if not going_on:
                break
        cycle.refresh_from_db()
        return cycle, counts

    try:
        # Once-only rows first (paper account and prices, bot state, the first playbook), as a running bot has them.
        for minutes in (10, 5):  # in time order: a tick before the newest cycle is SKIPPED (out of order)
            assert run(day - timedelta(minutes=minutes))[0].state == S.DONE
        cycle, counts = run(day + timedelta(minutes=30))
    finally:
        stage_tasks.env_reset()
    assert cycle.outcome == CycleOutcome.TRADED, cycle.reason
    over = {s: (n, STAGE_ROUND_TRIP_CEILING[s]) for s, n in counts.items() if n > STAGE_ROUND_TRIP_CEILING[s]}
    assert not over, f"round trips per stage above the ceiling (got, ceiling): {over}; all: {counts}"
