"""journal.bulk: reserved ids and one-statement inserts (the replay's journal path), on SQLite and PostgreSQL."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.db import IntegrityError, connection, transaction

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


def test_a_row_built_for_bulk_insert_equals_the_model_built_one_and_shares_no_default() -> None:
    from journal.bulk import row_new

    instrument = Instrument(pk=3, inst_id="BTC-USDT-SWAP")
    as_of = datetime(2025, 1, 1, tzinfo=UTC)
    made = Cycle(instrument=instrument, mode="replay", run_id="r", as_of=as_of, state="IDLE")
    built = row_new(Cycle, instrument=instrument, mode="replay", run_id="r", as_of=as_of, state="IDLE")
    fields = [f.attname for f in Cycle._meta.concrete_fields]
    assert [getattr(built, f) for f in fields] == [getattr(made, f) for f in fields]
    assert built.instrument is instrument and built.instrument_id == 3 and built._state.adding
    # A callable default (stage_times=dict) is called per row: rows never share it.
    assert built.stage_times == {} and built.stage_times is not row_new(Cycle).stage_times
    assert row_new(Cycle, instrument_id=5).instrument_id == 5
    with pytest.raises(TypeError, match="no field 'stages'"):
        row_new(Cycle, stages={})


def test_rows_built_for_bulk_insert_also_go_through_bulk_create_and_its_upsert(btc: Instrument) -> None:
    # The replay with a network brain writes placeholders first and upserts them at the end.
    from journal.bulk import row_new
    from tradebot.stages import CYCLE_FIELDS

    rows = Cycle.objects.bulk_create([row_new(Cycle, instrument=btc, mode=Mode.REPLAY, run_id="bulk-upsert",
                                              as_of=AS_OF.replace(minute=m), state=CycleState.IDLE) for m in (0, 5)])
    for row in rows:
        row.state, row.outcome, row.reason = CycleState.DONE, CycleOutcome.HOLD, f"held at {row.as_of:%M}"
    Cycle.objects.bulk_create(rows, update_conflicts=True, unique_fields=["id"], update_fields=list(CYCLE_FIELDS))
    stored = list(Cycle.objects.filter(run_id="bulk-upsert").order_by("as_of").values_list("state", "reason", "instrument_id"))
    assert stored == [(CycleState.DONE, "held at 00", btc.pk), (CycleState.DONE, "held at 05", btc.pk)]


def _json_values_as_a_save_stores_them(btc: Instrument) -> None:
    """The bulk path's JSON (orjson) stores what save() stores, and refuses what it refuses."""
    odd = {"int_key": {1: "one"}, "big": 2**70, "float": 0.1 + 0.2, "tiny": 1e-12, "text": "ü\t\\\n\"", "list": [True, None]}
    saved = _cycle(btc, 10)
    saved.decision = odd
    saved.save()
    with transaction.atomic():
        row = _cycle(btc, 11)
        row.decision = odd
        (row.pk,) = ids_reserve(model=Cycle, count=1)
        rows_insert(model=Cycle, objs=[row])
    stored = Cycle.objects.get(pk=row.pk).decision
    assert stored == Cycle.objects.get(pk=saved.pk).decision
    assert stored["int_key"] == {"1": "one"} and stored["big"] == 2**70 and stored["float"] == 0.1 + 0.2
    with pytest.raises(TypeError):  # a datetime is not JSON to save() either
        with transaction.atomic():
            bad = _cycle(btc, 12)
            bad.decision = {"at": AS_OF}
            (bad.pk,) = ids_reserve(model=Cycle, count=1)
            rows_insert(model=Cycle, objs=[bad])


@pytest.mark.django_db(transaction=True)
def test_json_columns_go_in_as_a_save_stores_them_on_sqlite(btc: Instrument) -> None:
    _json_values_as_a_save_stores_them(btc)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_json_columns_go_in_as_a_save_stores_them_on_postgresql(btc: Instrument) -> None:
    _json_values_as_a_save_stores_them(btc)


@pytest.mark.django_db(transaction=True)
def test_times_go_in_as_a_save_stores_them_on_sqlite(btc: Instrument) -> None:
    """The same text in the column as save() writes (SQLite sorts and compares it as text): UTC with
    microseconds, a fixed offset and a named zone, each read back as the same instant."""
    times = [AS_OF.replace(microsecond=123456), datetime(2024, 5, 1, 14, 5, tzinfo=timezone(timedelta(hours=2))),
             datetime(2024, 7, 1, 9, 30, tzinfo=ZoneInfo("America/New_York")), AS_OF]
    saved, bulk = [], []
    for i, when in enumerate(times):
        row = _cycle(btc, 20 + i)
        row.ended_at = when
        row.save()
        saved.append(row.pk)
    with transaction.atomic():
        for i, when in enumerate(times):
            row = _cycle(btc, 30 + i)
            row.ended_at = when
            (row.pk,) = ids_reserve(model=Cycle, count=1)
            bulk.append(row)
        rows_insert(model=Cycle, objs=bulk)

    def texts(pks: list[int]) -> list[str]:
        with connection.cursor() as cur:
            cur.execute(f"SELECT ended_at FROM journal_cycle WHERE id IN ({', '.join(map(str, pks))}) ORDER BY id")
            return [r[0] for r in cur.fetchall()]

    assert texts([r.pk for r in bulk]) == texts(saved)
    assert [Cycle.objects.get(pk=r.pk).ended_at for r in bulk] == times
