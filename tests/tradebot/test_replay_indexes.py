"""A replay's reads of orders and trades touch its own run's rows only (issue 21).

Validation folds and search trials run many replays in one database. A query that found a run's
trades or orders through the instrument's index read every run's rows on that instrument: with the
orders and trades of ~80 two-month replays in the journal, a two-month replay took 41 s instead of
13 s. Each SELECT on orders and trades a replay issues is asked for its SQLite plan here; none may
reach the rows through the instrument's index alone.
"""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from journal.models import Trade
from market.feeds.synthetic import SyntheticFeed
from tradebot.replay import replay_run

INST = "BTC-USDT-SWAP"
# The single-column indexes that hold every run's rows of an instrument.
INSTRUMENT_ONLY = re.compile(r"USING (?:COVERING )?INDEX (journal_trade_instrument_id_\w+|execution_order_inst_id_\w+)")


def _plans(sql: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
        return [row[-1] for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_a_replays_order_and_trade_reads_use_its_runs_indexes() -> None:
    if connection.vendor != "sqlite":
        pytest.skip("the query plans checked are SQLite's (PostgreSQL chooses by its own statistics)")
    start = datetime(2025, 3, 1, tzinfo=UTC)
    with CaptureQueriesContext(connection) as captured:
        summary = replay_run(inst_id=INST, start=start, end=start + timedelta(days=6), feed=SyntheticFeed(seed=7, start=start - timedelta(days=25), end=start + timedelta(days=7)))
    assert Trade.objects.filter(run_id=summary.run_id, status="closed").exists(), "no trade closed: nothing was read"
    selects = {q["sql"] for q in captured.captured_queries
               if q["sql"].startswith("SELECT") and re.search(r'FROM "(journal_trade|execution_order)"', q["sql"])}
    assert selects, "the replay read no orders or trades"
    wide = {}
    for sql in selects:
        used = [step for step in _plans(sql) if INSTRUMENT_ONLY.search(step)]
        if used:
            wide[sql[:160]] = used
    assert not wide, f"reads that go through every run's rows of the instrument: {wide}"
