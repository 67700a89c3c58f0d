"""The bulk replay path (tradebot/replay_bulk.py) writes what the per-cycle path writes (issue 21).

Each path runs inside a transaction rolled back after its dump, with the same run id: the ids the
second run gets are those the first one got, so every row can be compared as it is. The dump is every
row of every table of the apps a replay writes to; the wall-clock fields are left out (when the
replay ran: created/updated/started/ended times, each stage's `duration_ms`, the screener's latency).
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.apps import apps
from django.db import models, transaction

from market.feeds.synthetic import SyntheticFeed
from tests.conftest import SHARED_DATA
from tradebot import replay_frames
from tradebot.replay import replay_feed, replay_run

INST = "BTC-USDT-SWAP"
REAL_5M = SHARED_DATA / "okx_BTC-USDT-SWAP_5m_2022.csv.gz"
APPS = ("journal", "execution", "brain", "market", "tradebot")
WALL_CLOCK = {"started_at", "ended_at", "latency_ms"}


def _wall_clock(field: models.Field) -> bool:
    return field.name in WALL_CLOCK or bool(getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False))


def _clean(name: str, value: Any) -> Any:
    if name == "stage_times" and isinstance(value, dict):
        return {stage: {k: v for k, v in entry.items() if k != "duration_ms"} if isinstance(entry, dict) else entry
                for stage, entry in value.items()}
    if name == "history" and isinstance(value, list):  # an order's state changes: when the replay made them
        return [{k: v for k, v in step.items() if k != "at"} if isinstance(step, dict) else step for step in value]
    return value


def journal_dump() -> dict[str, list[dict[str, Any]]]:
    """Every row of the replay's apps, by table, in id order, without the wall-clock fields."""
    dump: dict[str, list[dict[str, Any]]] = {}
    for label in APPS:
        for model in apps.get_app_config(label).get_models():
            if model._meta.proxy or not model._meta.managed:
                continue
            names = [f.attname for f in model._meta.concrete_fields if not _wall_clock(f)]
            rows = model.objects.order_by("pk").values(*names)
            dump[model._meta.db_table] = [{k: _clean(k, v) for k, v in row.items()} for row in rows]
    return dump


def _summary(summary: Any) -> dict[str, Any]:
    figures = summary.as_dict()
    for wall in ("elapsed_seconds", "cycles_per_second", "bulk_cycles"):
        figures.pop(wall)
    return figures


def replay_and_dump(*, feed: Any, start: datetime, end: datetime, per_cycle: bool, **kw: Any) -> tuple[Any, dict]:
    """One replay in a transaction rolled back after its dump (its run id and its rows' ids are the next run's)."""
    from django.db import connection

    from brain.playbook import playbook_current

    if connection.vendor != "sqlite":
        pytest.skip("the dumps are compared id for id: SQLite's ids roll back with the transaction, a sequence's do not")

    playbook_current()  # the seeded playbook (its activation time is the wall clock's) before both runs
    with transaction.atomic():
        summary = replay_run(inst_id=INST, start=start, end=end, feed=feed, run_id="same-run", per_cycle=per_cycle, **kw)
        dump = journal_dump()
        dump["summary"] = [_summary(summary)]
        transaction.set_rollback(True)
    return summary, dump


def assert_same(bulk: dict[str, list[dict]], staged: dict[str, list[dict]]) -> None:
    """Equal dumps; else the first differing row of every table that differs."""
    assert bulk.keys() == staged.keys()
    differ = {}
    for table in bulk:
        a, b = bulk[table], staged[table]
        if len(a) != len(b):
            differ[table] = f"{len(a)} rows in bulk, {len(b)} per cycle"
            continue
        for x, y in zip(a, b, strict=True):
            if x != y:
                differ[table] = {k: (x[k], y[k]) for k in x if x[k] != y[k]}
                break
    assert not differ, differ


@pytest.mark.django_db
def test_sixty_days_of_real_okx_candles_journal_the_same_rows_both_ways() -> None:
    if not REAL_5M.is_file():
        pytest.skip(f"the real OKX 5m candles are not here ({REAL_5M}): see ../shared/data/PROVENANCE.md")
    feed = replay_feed(inst_id=INST, csv_path=str(REAL_5M))
    start = datetime(2022, 9, 1, tzinfo=UTC)
    end = start + timedelta(days=60)
    bulk, a = replay_and_dump(feed=feed, start=start, end=end, per_cycle=False)
    staged, b = replay_and_dump(feed=feed, start=start, end=end, per_cycle=True)
    # The scenario covers every kind of cycle: traded, held, no signal, and most of them written in bulk.
    outcomes = a["summary"][0]["outcomes"]
    assert {"traded", "hold", "no_signal"} <= set(outcomes), outcomes
    assert a["journal_trade"] and a["execution_order"] and a["journal_screenerlog"]
    assert bulk.bulk_cycles > bulk.cycles * 0.8, (bulk.bulk_cycles, bulk.cycles)
    assert staged.bulk_cycles is None
    assert len(a["journal_cycle"]) == bulk.cycles == 60 * 288
    assert_same(a, b)


@pytest.fixture(scope="module")
def synthetic() -> SyntheticFeed:
    return SyntheticFeed(seed=7, start=datetime(2025, 6, 15, tzinfo=UTC), end=datetime(2025, 8, 5, tzinfo=UTC))


@pytest.mark.django_db
@pytest.mark.parametrize("full", ["acted", "analyzed"])
def test_the_synthetic_market_journals_the_same_rows_both_ways(synthetic: SyntheticFeed, full: str) -> None:
    start = datetime(2025, 8, 1, tzinfo=UTC)
    bulk, a = replay_and_dump(feed=synthetic, start=start, end=start + timedelta(days=2), per_cycle=False,
                              full_snapshots=full)
    _, b = replay_and_dump(feed=synthetic, start=start, end=start + timedelta(days=2), per_cycle=True,
                           full_snapshots=full)
    assert bulk.bulk_cycles > 0
    assert_same(a, b)


@pytest.mark.django_db
@pytest.mark.parametrize("per_cycle", [False, True])
def test_a_cycle_sees_only_candles_closed_by_its_time_on_both_paths(per_cycle: bool, tmp_path: Path) -> None:
    """Every candle from T on changed (mirrored): every cycle up to T journals exactly what it did before
    (a cycle at t sees only the bars closed by t), and the price each cycle saw is the close of the last
    bar closed by its time."""
    from market.feeds.synthetic import SyntheticMarket
    from tests.tradebot.test_replay_learn import candles_csv

    start = datetime(2025, 8, 1, tzinfo=UTC)
    t = start + timedelta(hours=13, minutes=5)
    end = start + timedelta(hours=20)
    market = SyntheticMarket(7, start - timedelta(days=12), end + timedelta(days=1), (INST,))
    kept = replay_feed(inst_id=INST, csv_path=str(candles_csv(tmp_path / "a.csv", market)))
    changed = replay_feed(inst_id=INST, csv_path=str(candles_csv(tmp_path / "b.csv", market, mirror_after=t)))
    summary, before = replay_and_dump(feed=kept, start=start, end=end, per_cycle=per_cycle)
    _, after = replay_and_dump(feed=changed, start=start, end=end, per_cycle=per_cycle)
    up_to_t = [row for row in before["journal_cycle"] if row["as_of"] <= t]
    assert len(up_to_t) == 13 * 12 + 1
    assert up_to_t == [row for row in after["journal_cycle"] if row["as_of"] <= t]
    assert before["journal_cycle"] != after["journal_cycle"]  # the change is seen once its bars have closed
    series = kept.series(INST, kept.timeframes(INST)[0])
    for row in before["journal_cycle"]:
        end_i = series.closed_end(int(row["as_of"].timestamp() * 1000))
        assert int(series.ts[end_i - 1]) + series.tf_ms <= int(row["as_of"].timestamp() * 1000)
        assert Decimal(row["snapshot"]["price"]) == Decimal(repr(float(series.close[end_i - 1]))), row["as_of"]
    if not per_cycle:
        assert summary.bulk_cycles > 0


@pytest.mark.django_db
def test_replays_in_one_process_share_the_indicators_of_the_same_candles(synthetic: SyntheticFeed) -> None:
    replay_frames.history_cache_clear()
    start = datetime(2025, 8, 1, tzinfo=UTC)
    first = replay_run(inst_id=INST, start=start, end=start + timedelta(hours=6), feed=synthetic, run_id="cache-a")
    misses = replay_frames.HISTORY_STATS["misses"]
    assert misses > 0 and replay_frames.HISTORY_STATS["hits"] == 0
    second = replay_run(inst_id=INST, start=start, end=start + timedelta(hours=6), feed=synthetic, run_id="cache-b")
    assert replay_frames.HISTORY_STATS == {"hits": misses, "misses": misses}
    assert first.decisions == second.decisions and first.outcomes == second.outcomes
    # Other candles (a longer history): computed anew, never another history's indicators.
    replay_run(inst_id=INST, start=start, end=start + timedelta(hours=7), feed=synthetic, run_id="cache-c")
    assert replay_frames.HISTORY_STATS["misses"] > misses


@pytest.mark.django_db
def test_the_command_keeps_the_per_cycle_path_behind_a_flag(synthetic: SyntheticFeed, capsys: pytest.CaptureFixture) -> None:
    import json

    from django.core.management import call_command

    for flag, bulk in (((), True), (("--per-cycle",), False)):
        call_command("replay", "--inst", INST, "--from", "2025-08-01", "--to", "2025-08-01T06:00", "--synthetic",
                     "--json", *flag)
        data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert data["cycles"] == 72
        assert (data["bulk_cycles"] is not None and data["bulk_cycles"] > 0) if bulk else data["bulk_cycles"] is None


def test_a_claude_replay_writes_no_cycle_in_bulk() -> None:
    """Claude's screener and analyst are the model: nothing it journals is known without a call."""
    from types import SimpleNamespace

    from tradebot.replay_bulk import BulkCycles

    bulk = BulkCycles(snapshots=SimpleNamespace(), full_snapshots="acted")  # type: ignore[arg-type]
    env = SimpleNamespace(brain_name="claude", manual_trigger=False)
    cycle = SimpleNamespace(stage_times={})
    assert bulk.cycle(cycle, env, SimpleNamespace()) is None  # type: ignore[arg-type]
    assert (bulk.bulk, bulk.staged) == (0, 1)
