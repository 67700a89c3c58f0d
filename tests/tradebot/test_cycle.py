"""Cycle mechanics: one cycle per instrument, conditional claims, the lock, stale cycles."""
from __future__ import annotations

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
    settings.CYCLE_STALE_SECONDS = 60
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
