"""The fast paths of the exclusive paper exchange and of order settlement: fewer statements, the same rows.

Each test fails on the code before its fast path (by the statements it sees) or when the fast path
would change a figure or how it prints (the journal keeps strings of these decimals).
"""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from execution.exchanges.paper import PaperExchange
from execution.models import BotState, Order, OrderState
from execution.services import _OUTCOME_FIELDS, _note, _order_intent, _settle, order_place
from execution.bot import risk_daily_reset, risk_trade_closed
from execution.sync import account_sync
from market.feeds.base import Bar
from tests.execution.helpers import BTC, T0, approve, decision

D = Decimal


def bar(minutes: int, o: str, h: str, lo: str, c: str) -> Bar:
    return Bar(ts=T0.replace(hour=7, minute=50) + timedelta(minutes=minutes), open=D(o), high=D(h), low=D(lo), close=D(c), volume=D("1"))


def printed(ex: PaperExchange) -> list[str]:
    """The book as the journal would print it (repr shows each Decimal's digits, not only its value)."""
    return [repr([replace(p, pos_id="") for p in ex.positions()]), repr(ex.account()),
            repr([replace(c, pos_id="") for c in ex.closed_positions()]), repr(ex.now())]


@pytest.mark.django_db
def test_the_exclusive_exchange_writes_without_reading_and_holds_what_a_read_gives(btc) -> None:
    plain = PaperExchange(account_name="plain")
    fast = PaperExchange(account_name="fast", exclusive=True)
    market = approve(decision(size_pct=0.05, leverage=2, stop_loss=49000.0, take_profit=52000.0), last="50000", cycle_id=1)
    for ex in (plain, fast):
        ex.set_funding_rate(BTC, D("0.0001"))
        ex.process_bar(BTC, bar(0, "50000", "50050", "49950", "50000"))
        ex.place_order(market)  # the exclusive one reads its book and the account's client order ids here, once
    assert printed(plain) == printed(fast)
    with CaptureQueriesContext(connection) as seen:
        fast.set_funding_rate(BTC, D("0.0002"))  # kept in memory
        fast.process_bar(BTC, bar(5, "50000", "50100", "49980", "50080"))  # quiet
        fast.process_bar(BTC, bar(10, "50080", "50120", "50010", "50100"))  # 08:00: funding, from the book
        fast.close_position(inst_id=BTC, pos_side="long")  # from the book
        fast.exposed()
    reads = [q["sql"] for q in seen.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert reads == []
    plain.set_funding_rate(BTC, D("0.0002"))
    plain.process_bar(BTC, bar(5, "50000", "50100", "49980", "50080"))
    plain.process_bar(BTC, bar(10, "50080", "50120", "50010", "50100"))
    plain.close_position(inst_id=BTC, pos_side="long")
    fast.flush()
    assert printed(plain) == printed(fast)
    closed = fast.closed_positions()
    assert len(closed) == 1 and closed[0].funding == D("-0.10016")  # the rate set last (0.0002), charged at the open and not fast.exposed()


@pytest.mark.django_db
def test_a_new_order_is_settled_by_one_update_and_returned_as_the_locked_path_left_it(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    with CaptureQueriesContext(connection) as seen:
        order = order_place(approved=approved, cycle_id=None, trade_context={"mode": "live"}, exchange=paper)
    savepoints = [q["sql"] for q in seen.captured_queries if q["sql"].startswith("SAVEPOINT")]
    # The intent's INSERT, the exchange's book and the trade's INSERT (one trade per opening order: a conflict
    # must leave the caller's transaction usable); the settlement needs none.
    assert len(savepoints) == 3
    stored = Order.objects.get(pk=order.pk)
    assert (order.state, stored.state) == (OrderState.FILLED, OrderState.FILLED)
    assert [h["to"] for h in stored.history] == [OrderState.SUBMITTED, OrderState.FILLED]
    # Not read back: the row in hand is made to hold what a read gives.
    settled_at = next(i for i, q in enumerate(seen.captured_queries) if q["sql"].startswith('UPDATE "execution_order"'))
    assert not [q["sql"] for q in seen.captured_queries[settled_at:] if 'FROM "execution_order"' in q["sql"]]
    # The row as read, with the exchange's figures applied (what the journal prints from it).
    assert (repr(order.size), repr(order.price), repr(order.leverage)) == (repr(stored.size), repr(stored.price), repr(stored.leverage))
    assert (order.filled_size, order.avg_fill_price, order.fee) == (stored.filled_size, stored.avg_fill_price, stored.fee)
    # Every column as a read prints it; the outcome's as the exchange gave it (equal values), as before.
    for field in Order._meta.concrete_fields:
        mine, read = getattr(order, field.attname), getattr(stored, field.attname)
        exact = not isinstance(read, (dict, list)) and field.attname not in _OUTCOME_FIELDS
        assert repr(mine) == repr(read) if exact else mine == read, field.attname


@pytest.mark.django_db
def test_settling_a_row_changed_since_it_was_created_takes_the_locked_path(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    order, created = _order_intent(approved=approved, exchange=paper, cycle_id=None, context={})
    result = paper.place_order(approved)
    _note(Order.objects.get(pk=order.pk), "looked up by another worker")  # the row in hand is stale now
    with CaptureQueriesContext(connection) as seen:
        settled = _settle(order, result, approved, {}, created=created)
    assert any(q["sql"].startswith("SAVEPOINT") for q in seen.captured_queries)  # the locked read-modify-write
    assert (settled.state, settled.error_message) == (OrderState.FILLED, "looked up by another worker")


@pytest.mark.django_db
def test_the_sync_sets_the_day_start_once_and_only_raises_the_peak(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    account_sync(exchange=paper)  # the scope's first use makes the row
    row = BotState.objects.get(scope="live")
    assert (row.day_start_equity, row.peak_equity, row.day_start_date) == (D("10000"), D("10000"), T0.date())
    BotState.objects.filter(scope="live").update(day_start_equity=D("9000"), peak_equity=D("12000"))
    with CaptureQueriesContext(connection) as seen:
        account_sync(exchange=paper)
    assert not any(q["sql"].startswith("SAVEPOINT") for q in seen.captured_queries)  # one UPDATE, no locked read
    row.refresh_from_db()
    assert (row.day_start_equity, row.peak_equity) == (D("9000"), D("12000"))  # neither is lowered nor reset
    BotState.objects.filter(scope="live").update(peak_equity=D("9500"))
    account_sync(exchange=paper)
    row.refresh_from_db()
    assert row.peak_equity == D("10000")


@pytest.mark.django_db
def test_a_close_is_counted_by_one_update_and_only_the_limit_takes_the_lock(settings) -> None:
    settings.MAX_CONSECUTIVE_LOSSES = 3
    risk_daily_reset(now=T0, equity=D("10000"))  # the scope's first use makes the row
    with CaptureQueriesContext(connection) as seen:
        view = risk_trade_closed(pnl=D("-1"), now=T0)
        view = risk_trade_closed(pnl=D("-1"), now=T0)
    assert view.consecutive_losses == 2 and view.state == "RUNNING"
    assert not [q["sql"] for q in seen.captured_queries if q["sql"].startswith("SAVEPOINT") or "FOR UPDATE" in q["sql"]]
    assert len(seen.captured_queries) == 4  # per close: the UPDATE and one read
    with CaptureQueriesContext(connection) as seen:
        view = risk_trade_closed(pnl=D("-1"), now=T0)
    assert (view.consecutive_losses, view.state, view.until) == (3, "COOLDOWN", T0 + timedelta(seconds=settings.COOLDOWN_AFTER_LOSS_STREAK))
    assert any(q["sql"].startswith("SAVEPOINT") for q in seen.captured_queries)  # the state changes in the locked path
    assert risk_trade_closed(pnl=D("5"), now=T0).consecutive_losses == 0
    row = BotState.objects.get(scope="live")
    assert (row.consecutive_losses, row.state, row.day_start_equity) == (0, "COOLDOWN", D("10000"))


@pytest.mark.django_db
def test_the_daily_reset_is_one_update_and_keeps_the_days_start_within_the_day() -> None:
    risk_daily_reset(now=T0, equity=D("10000"))
    with CaptureQueriesContext(connection) as seen:
        view = risk_daily_reset(now=T0 + timedelta(hours=3), equity=D("9000"))  # the same day again: kept
    assert not [q["sql"] for q in seen.captured_queries if q["sql"].startswith("SAVEPOINT") or "FOR UPDATE" in q["sql"]]
    assert (view.day_start_equity, view.peak_equity) == (D("10000"), D("10000"))
    view = risk_daily_reset(now=T0 + timedelta(days=1), equity=D("11000"))
    row = BotState.objects.get(scope="live")
    assert (view.day_start_equity, view.peak_equity) == (D("11000"), D("11000"))
    assert (row.day_start_equity, row.day_start_date, row.peak_equity) == (D("11000"), (T0 + timedelta(days=1)).date(), D("11000"))
