"""journal.bulk: reserved ids and one-statement inserts (the replay's journal path), on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from journal.bulk import BulkWriteError, ids_reserve, rows_insert
from journal.models import Cycle, CycleOutcome, CycleState, Mode, RiskRejection, ScreenerLog
from market.models import Instrument

AS_OF = datetime(2024, 5, 1, 12, 5, tzinfo=UTC)


@pytest.fixture
def btc(db: None) -> Instrument:
    return Instrument.objects.create(inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"))


def _cycle(btc: Instrument, minute: int) -> Cycle:
    return Cycle(instrument=btc, mode=Mode.REPLAY, run_id="bulk-test", as_of=AS_OF.replace(minute=minute),
                 state=CycleState.DONE, outcome=CycleOutcome.HOLD, reason="HOLD: nothing to do",
                 ended_at=AS_OF.replace(minute=minute), stage_times={"SCREENING": {"duration_ms": 0.1}},
                 decision={"decision": {"action": "HOLD"}, "nested": [1, 2.5, None, "ü"]}, snapshot=None)


def _reserved_rows_round_trip(btc: Instrument) -> None:
    with transaction.atomic():
        first = ids_reserve(model=Cycle, count=3)
        second = ids_reserve(model=Cycle, count=2)
        assert len(set(first) | set(second)) == 5  # two reservations never share an id
        rows = [_cycle(btc, m) for m in range(5)]
        for row, pk in zip(rows, first + second, strict=True):
            row.pk = pk
        # A row pointing to a cycle that is not inserted yet: the foreign key is checked at commit.
        RiskRejection.objects.create(instrument=btc, cycle_id=first[0], mode=Mode.REPLAY, decision_json={},
                                     failed_rules=[{"rule": "r", "reason": "x"}])
        assert rows_insert(model=Cycle, objs=rows) == 5
    stored = {c.pk: c for c in Cycle.objects.filter(run_id="bulk-test")}
    assert sorted(stored) == sorted(first + second)
    for row in rows:
        got = stored[row.pk]
        assert got.as_of == row.as_of and got.ended_at == row.ended_at and got.started_at is not None
        assert got.decision == row.decision and got.stage_times == row.stage_times and got.snapshot is None
        assert (got.state, got.outcome, got.reason, got.instrument_id) == (row.state, row.outcome, row.reason, btc.pk)
    # The ordinary path goes on after the reserved ids: no collision.
    later = Cycle.objects.create(instrument=btc, mode=Mode.REPLAY, run_id="bulk-test", as_of=AS_OF)
    assert later.pk > max(first + second)


def _a_dangling_reference_still_fails_at_commit(btc: Instrument) -> None:
    with pytest.raises(IntegrityError):
        with transaction.atomic():
            (pk,) = ids_reserve(model=Cycle, count=1)
            ScreenerLog.objects.create(instrument=btc, cycle_id=pk, mode=Mode.REPLAY, signal=False)
            # the cycle row is never inserted


@pytest.mark.django_db(transaction=True)
def test_reserved_ids_and_one_insert_store_the_same_rows_on_sqlite(btc: Instrument) -> None:
    _reserved_rows_round_trip(btc)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_reserved_ids_and_one_insert_store_the_same_rows_on_postgresql(btc: Instrument) -> None:
    _reserved_rows_round_trip(btc)


@pytest.mark.django_db(transaction=True)
def test_a_reference_to_a_reserved_id_never_inserted_fails_at_commit_on_sqlite(btc: Instrument) -> None:
    _a_dangling_reference_still_fails_at_commit(btc)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_reference_to_a_reserved_id_never_inserted_fails_at_commit_on_postgresql(btc: Instrument) -> None:
    _a_dangling_reference_still_fails_at_commit(btc)


@pytest.mark.django_db(transaction=True)
def test_ids_are_only_reserved_inside_a_transaction(btc: Instrument) -> None:
    with pytest.raises(BulkWriteError, match="transaction"):
        ids_reserve(model=Cycle, count=2)


@pytest.mark.django_db
def test_a_row_without_a_primary_key_is_refused(btc: Instrument) -> None:
    with pytest.raises(BulkWriteError, match="primary key"):
        rows_insert(model=Cycle, objs=[_cycle(btc, 1)])
