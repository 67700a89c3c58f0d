"""A replay's reads of orders, trades and paper positions find their rows through an index on what they ask
for (issue 21).

Validation folds and search trials run many replays in one database, and a run accumulates hundreds of
trades. A read that found a run's rows through a wider index (the instrument's, the run's alone, the
account's alone) read every row of it: with the orders and trades of ~80 two-month replays in the
journal a two-month replay took 41 s instead of 13 s, and the brain's "last 20 trades" sorted all the
run's trades at every analysed cycle (4 ms at 640 trades, 0.2 ms through its index). Every SELECT on
those tables a replay issues is asked for its SQLite plan here: the index it uses must constrain each
of the run, mode, status, state and account columns the query filters on.
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
TABLES = ("journal_trade", "execution_order", "execution_paperposition", "execution_paperorder")
SCOPING = ("run_id", "mode", "status", "state", "account_id")
# `"journal_trade"."status" = 'open'`, `"execution_order"."state" IN (...)`
FILTERED = re.compile(r'"(\w+)"\."(' + "|".join(SCOPING) + r')" (?:=|IN)')
# `SEARCH journal_trade USING INDEX trade_run_open (run_id=? AND mode=? AND status=?)`
STEP = re.compile(r"SEARCH (\w+) USING (?:COVERING )?INDEX (\w+) \(([^)]*)\)")


def _plan(sql: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}")
        return [row[-1] for row in cursor.fetchall()]


def _unconstrained(sql: str) -> dict[str, set[str]]:
    """Per table of TABLES: the scoping columns the query filters on that no index step of its plan constrains
    (a lookup by primary key or by a unique client order id is narrow already: nothing to ask of it)."""
    filtered: dict[str, set[str]] = {}
    for table, column in FILTERED.findall(sql):
        if table in TABLES:
            filtered.setdefault(table, set()).add(column)
    constrained: dict[str, set[str]] = {}
    narrow: set[str] = set()
    for step in _plan(sql):
        if "PRIMARY KEY" in step or "client_order_id" in step:
            narrow.add(step.split()[1])
        for table, _index, terms in STEP.findall(step):
            constrained.setdefault(table, set()).update(re.findall(r"(\w+)[=<>]", terms))
    return {table: missing for table, columns in filtered.items()
            if table not in narrow and (missing := columns - constrained.get(table, set()))}


@pytest.mark.django_db(transaction=True)
def test_a_replays_reads_find_their_rows_through_an_index_on_what_they_ask() -> None:
    if connection.vendor != "sqlite":
        pytest.skip("the query plans checked are SQLite's (PostgreSQL chooses by its own statistics)")
    start = datetime(2025, 3, 1, tzinfo=UTC)
    with CaptureQueriesContext(connection) as captured:
        summary = replay_run(inst_id=INST, start=start, end=start + timedelta(days=6),
                             feed=SyntheticFeed(seed=7, start=start - timedelta(days=25), end=start + timedelta(days=7)))
    assert Trade.objects.filter(run_id=summary.run_id, status="closed").exists(), "no trade closed: nothing was read"
    selects = {q["sql"] for q in captured.captured_queries
               if q["sql"].startswith("SELECT") and any(f'FROM "{t}"' in q["sql"] for t in TABLES)}
    assert {t for t in TABLES[:3] if any(f'FROM "{t}"' in sql for sql in selects)} == set(TABLES[:3]), \
        "the replay did not read orders, trades and positions"
    wide = {sql[:200]: (missing, _plan(sql)) for sql in selects if (missing := _unconstrained(sql))}
    assert not wide, f"reads that go through more rows than they ask for: {wide}"
