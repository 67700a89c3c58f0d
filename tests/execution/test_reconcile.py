"""Journal and exchange kept in agreement after a lost worker (#16, defect 6): a filled opening order always gets its
trade, an order that never reached the exchange is not sent late, and one paper account never mixes live
(wall-clock) and virtual times, nor moves its clock backwards."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

import execution.services as services
from execution.exchanges.paper import PaperExchange
from execution.exchanges.paper_market import ClockMixed
from execution.models import Order, OrderState, PaperAccount, PaperOrder
from execution.services import order_place
from execution.sync import account_sync
from journal.models import JournalEvent, Trade, TradeStatus
from tests.execution.helpers import BTC, T0, approve, decision

D = Decimal
CONTEXT = {"strategy_used": "breakout", "confidence_at_entry": 0.7, "market_regime": "trending_up", "mode": "live"}


def _past_the_stage_limit(order: Order) -> None:
    """As the account sync finds it one stage limit later (the worker that wrote it is gone by then)."""
    Order.objects.filter(pk=order.pk).update(created_at=timezone.now() - timedelta(hours=1))


def test_a_filled_opening_order_whose_worker_died_before_its_trade_gets_it_from_the_exchanges_fill(
        paper: PaperExchange, monkeypatch) -> None:
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")

    def worker_killed(**_):  # noqa: ANN003, ANN202 - SIGKILL between the fill's write and the trade's
        raise SystemExit("killed")

    monkeypatch.setattr(services, "trade_open_record", worker_killed)
    with pytest.raises(SystemExit):
        order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    monkeypatch.undo()
    order = Order.objects.get()
    assert order.state == OrderState.FILLED and not Trade.objects.exists() and len(paper.positions()) == 1
    account_sync(exchange=paper)  # still inside the stage limit: that worker might be writing it right now
    assert not Trade.objects.exists()
    _past_the_stage_limit(order)
    result = account_sync(exchange=paper)
    trade = Trade.objects.get()
    fill = PaperOrder.objects.get()
    assert result.trades_recovered == [trade.pk] and trade.status == TradeStatus.OPEN
    assert (trade.client_order_id, trade.entry_price, trade.size, trade.opened_at) == (
        order.client_order_id, fill.avg_px, fill.filled_size, fill.updated_at)
    assert JournalEvent.objects.filter(kind="trade_recovered").count() == 1
    account_sync(exchange=paper)
    assert Trade.objects.count() == 1  # once


def test_a_pending_order_the_exchange_never_got_is_canceled_after_the_stage_limit_not_sent_late(
        paper: PaperExchange, monkeypatch) -> None:
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")

    def worker_killed(order):  # noqa: ANN001, ANN202 - SIGKILL after the intent row, before the exchange call
        raise SystemExit("killed")

    monkeypatch.setattr(paper, "_place_order", worker_killed)
    with pytest.raises(SystemExit):
        order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    monkeypatch.undo()
    order = Order.objects.get()
    account_sync(exchange=paper)
    assert Order.objects.get().state == OrderState.PENDING  # inside the stage limit: maybe still in flight
    _past_the_stage_limit(order)
    account_sync(exchange=paper)
    order.refresh_from_db()
    assert order.state == OrderState.CANCELED and "never reached the exchange" in order.error_message
    again = order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)  # a late redelivery
    assert again.state == OrderState.CANCELED and not PaperOrder.objects.exists() and not paper.positions()


def test_one_paper_account_never_mixes_wall_clock_and_virtual_times_nor_moves_its_clock_back(
        btc) -> None:  # noqa: ANN001
    now = timezone.now()
    live = PaperExchange(account_name="live-bot")
    live.set_price(BTC, D("50000"), now)  # the first price fixes the clock: the wall clock
    assert PaperAccount.objects.get(name="live-bot").clock == "wall"
    with pytest.raises(ClockMixed, match="follows the wall clock"):
        live.set_price(BTC, D("40000"), T0)  # a driver's virtual time after a real-time cycle: the defect's cause
    live.set_price(BTC, D("50010"), now - timedelta(seconds=30))  # an older real-time price: the clock stays
    assert live.now() == now and live.account().equity == D("10000")
    virtual = PaperExchange(account_name="replayish")
    virtual.set_price(BTC, D("40000"), T0)
    assert PaperAccount.objects.get(name="replayish").clock == "virtual"
    virtual.set_price(BTC, D("40100"), T0 + timedelta(minutes=5))  # a virtual clock moves on as it likes
    with pytest.raises(ClockMixed, match="follows a virtual clock"):
        virtual.set_price(BTC, D("50000"), now)  # a jump from its past to now: a live bot on a replay's account
    assert virtual.now() == T0 + timedelta(minutes=5)


def test_a_flatten_with_a_long_reason_still_closes_its_trade(paper: PaperExchange) -> None:
    from execution.services import positions_flatten

    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    reason = "a person's sentence: flat before the weekend, the news looks bad"
    positions_flatten(exchange=paper, reason=reason)  # PostgreSQL refused the 60-character exit reason
    trade = Trade.objects.get()
    assert trade.status == TradeStatus.CLOSED and reason.startswith(trade.exit_reason)
    assert len(trade.exit_reason) == Trade._meta.get_field("exit_reason").max_length


def test_two_account_syncs_at_once_close_a_stopped_trade_once_and_count_its_loss_once(
        paper: PaperExchange, monkeypatch) -> None:
    """The orders worker runs several processes (issue 20): a beat sync and another (a stream's, a close order's) can
    both find the stop's close; only the one whose conditional UPDATE closes the trade counts the loss."""
    from execution.selectors import bot_state
    from execution.sync import SyncResult

    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    paper.set_price(BTC, D("48500"), T0 + timedelta(minutes=5))  # the stop closes the position at the exchange
    assert paper.positions() == [] and Trade.objects.get().status == TradeStatus.OPEN
    before = bot_state().consecutive_losses
    closed_positions = paper.closed_positions
    other: list[SyncResult] = []
    racing = [True]

    def the_other_sync_closes_it_meanwhile(**kwargs):  # noqa: ANN003, ANN202
        if racing.pop() if racing else False:  # this sync read the trade open; the other one runs to its end now
            other.append(account_sync(exchange=paper))
        return closed_positions(**kwargs)

    monkeypatch.setattr(paper, "closed_positions", the_other_sync_closes_it_meanwhile)
    first = account_sync(exchange=paper)
    trade = Trade.objects.get()
    assert trade.status == TradeStatus.CLOSED and trade.pnl_usd < 0
    assert other[0].closed_trade_ids == [trade.pk] and first.closed_trade_ids == []
    assert bot_state().consecutive_losses == before + 1  # one loss, counted once


def _filled_without_its_trade(paper: PaperExchange, monkeypatch) -> Order:  # noqa: ANN001
    """An opening order the exchange filled whose worker was killed before it wrote the trade."""
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")

    def worker_killed(**_):  # noqa: ANN003, ANN202
        raise SystemExit("killed")

    monkeypatch.setattr(services, "trade_open_record", worker_killed)
    with pytest.raises(SystemExit):
        order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    monkeypatch.undo()
    return Order.objects.get()


def test_the_journal_refuses_a_second_trade_for_one_opening_order_but_not_for_trades_without_one(
        paper: PaperExchange, monkeypatch) -> None:
    from django.db import IntegrityError, transaction

    order = _filled_without_its_trade(paper, monkeypatch)
    fill = paper.get_order(inst_id=BTC, client_order_id=order.client_order_id)
    first = services.trade_open_record(order=order, fill=fill, context=dict(CONTEXT))
    copy = Trade.objects.get(pk=first.pk)
    copy.pk = None
    with pytest.raises(IntegrityError), transaction.atomic():
        copy.save(force_insert=True)
    for _ in range(2):  # trades journaled without an order id (older rows, tests, imports) stay allowed
        blank = Trade.objects.get(pk=first.pk)
        blank.pk, blank.client_order_id = None, ""
        blank.save(force_insert=True)
    assert Trade.objects.filter(client_order_id=order.client_order_id).count() == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_writers_that_journal_one_fill_at_once_leave_one_trade_and_both_get_it(
        paper: PaperExchange, monkeypatch) -> None:
    """Two account syncs (the orders worker's processes) recovering the same fill: both read "no trade yet",
    the first INSERT waits uncommitted while the second runs; the second's INSERT waits on the first's and,
    once the first commits, takes the first one's trade instead of writing its own."""
    import threading
    import time

    from django.db import connection, connections, transaction

    order = _filled_without_its_trade(paper, monkeypatch)
    fill = paper.get_order(inst_id=BTC, client_order_id=order.client_order_id)
    inserted, release = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def first() -> None:
        try:
            with transaction.atomic():
                results["first"] = services.trade_open_write(order=order, fill=fill, context=dict(CONTEXT))
                inserted.set()
                release.wait(20)
        finally:
            connections.close_all()

    def second() -> None:
        try:
            inserted.wait(20)
            results["second"] = services.trade_open_write(order=order, fill=fill, context=dict(CONTEXT))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    # The first commits once the second is seen waiting on a lock (its INSERT behind the first's), or after 5 s.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'")
            if cursor.fetchone()[0]:
                break
        time.sleep(0.05)
    release.set()
    for thread in threads:
        thread.join(30)
    trades = list(Trade.objects.filter(client_order_id=order.client_order_id))
    assert len(trades) == 1, f"{len(trades)} trades for one fill"
    (trade_1, written_1), (trade_2, written_2) = results["first"], results["second"]  # type: ignore[misc]
    assert (written_1, written_2) == (True, False)
    assert trade_1.pk == trade_2.pk == trades[0].pk
