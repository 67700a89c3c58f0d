"""Order placement, account sync, the bot's states and the gate's bookkeeping, on the paper exchange
(and on the OKX fake for the unknown-outcome path)."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from execution.exchanges.base import Position
from execution.exchanges.paper import PaperExchange
from execution.models import ORDER_TRANSITIONS, BotStatus, InvalidTransition, Order, OrderState, PaperOrder, transition
from execution.risk import MarketRef
from execution.selectors import account_state, bot_state
from execution.services import order_place, positions_flatten, risk_gate_run
from execution.bot import bot_halt, bot_peak_raise, bot_resume, bot_state_refresh, risk_daily_reset, risk_trade_closed
from execution.sync import account_sync
from journal.models import RiskRejection, Trade
from market.feeds.base import Bar
from tests.execution.helpers import BTC, T0, account, approve, decision

D = Decimal
CONTEXT = {"strategy_used": "breakout", "confidence_at_entry": 0.7, "market_regime": "trending_up", "reasoning": "because",
           "indicators_entry": {"rsi": 55}, "playbook_version": 3, "size_pct": "0.05", "mode": "live"}


def bar(ts, o, h, l, c) -> Bar:  # noqa: E741
    return Bar(ts=ts, open=D(str(o)), high=D(str(h)), low=D(str(l)), close=D(str(c)), volume=D("1"))


def open_trade(paper: PaperExchange, *, cycle: int = 1) -> Order:
    paper.set_price(BTC, D("50000"), T0)
    order = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000", cycle_id=cycle)
    return order_place(approved=order, cycle_id=None, trade_context=CONTEXT, exchange=paper)


def test_an_opening_fill_writes_the_order_and_an_open_journal_trade(paper: PaperExchange) -> None:
    order = open_trade(paper)
    assert order.state == OrderState.FILLED and order.filled_size == D("1") and order.avg_fill_price == D("50025")
    assert [h["to"] for h in order.history] == [OrderState.SUBMITTED, OrderState.FILLED]
    trade = Trade.objects.get()
    assert (trade.status, trade.direction, trade.entry_price, trade.size) == ("open", "LONG", D("50025"), D("1"))
    assert (trade.strategy_used, trade.market_regime, trade.playbook_version, trade.client_order_id) == (
        "breakout", "trending_up", 3, order.client_order_id)


def test_placing_the_same_approved_order_twice_sends_it_once(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    first = order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    second = order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    assert first.pk == second.pk and Order.objects.count() == 1
    assert PaperOrder.objects.count() == 1 and Trade.objects.count() == 1 and len(paper.positions()) == 1


def test_a_pending_order_left_by_a_crash_is_looked_up_before_it_is_sent(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    paper.place_order(approved)  # it reached the exchange...
    Order.objects.create(client_order_id=approved.client_order_id, exchange="paper", inst_id=BTC, action="OPEN_LONG",
                         side="buy", pos_side="long", order_type="market", size=approved.size, approved=approved.as_json())
    order = order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)  # ...then we crashed
    assert order.state == OrderState.FILLED and PaperOrder.objects.count() == 1


def test_an_exchange_rejection_is_recorded_not_retried(btc) -> None:
    poor = PaperExchange(account_name="poor", start_balance=D("100"))
    poor.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    order = order_place(approved=approved, cycle_id=None, exchange=poor)
    assert (order.state, order.error_code) == (OrderState.REJECTED, "51008")
    assert order_place(approved=approved, cycle_id=None, exchange=poor).state == OrderState.REJECTED
    assert PaperOrder.objects.count() == 1 and Trade.objects.count() == 0


def test_order_place_refuses_anything_but_an_approved_order(paper: PaperExchange) -> None:
    with pytest.raises(TypeError):
        order_place(approved=decision(), cycle_id=None, exchange=paper)  # type: ignore[arg-type]
    assert Order.objects.count() == 0


def test_a_stop_out_becomes_a_closed_trade_with_the_exchanges_numbers(paper: PaperExchange) -> None:
    open_trade(paper)
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 50000, 50100, 48900, 49100))
    result = account_sync(exchange=paper)
    trade = Trade.objects.get(pk=result.closed_trade_ids[0])
    assert (trade.status, trade.exit_reason, trade.exit_price) == ("closed", "stop_loss", D("49000"))
    assert trade.fees_usd == D("0.250125") + D("0.245")
    assert trade.pnl_usd == D("-10.25") - D("0.250125") - D("0.245")
    assert trade.duration_seconds == 3600
    assert bot_state().consecutive_losses == 1
    assert account_sync(exchange=paper).closed_trade_ids == []  # nothing closes twice


def test_a_close_decision_closes_the_trade_as_a_signal(paper: PaperExchange) -> None:
    open_trade(paper)
    paper.set_price(BTC, D("51000"), T0 + timedelta(minutes=30))
    close = approve(decision("CLOSE"), last="51000", positions=paper.positions(), cycle_id=2)
    order = order_place(approved=close, cycle_id=None, exchange=paper)
    assert order.state == OrderState.FILLED
    trade = Trade.objects.get()
    assert (trade.status, trade.exit_reason, trade.exit_price) == ("closed", "signal", D("50974.5"))
    assert trade.pnl_usd > 0 and bot_state().consecutive_losses == 0


def test_another_runs_close_order_is_never_the_reason_a_live_position_closed(paper: PaperExchange) -> None:
    """A replay shares the orders table: its close on the same instrument and side says nothing about ours."""
    open_trade(paper)
    Order.objects.create(client_order_id="replayclose1", exchange="paper", mode="replay", run_id="replay-abc", inst_id=BTC,
                         action="CLOSE", side="sell", pos_side="long", order_type="market", size=D("1"), reduce_only=True,
                         state=OrderState.FILLED, trade_context={"exit_reason": "flatten"})
    paper.set_price(BTC, D("50500"), T0 + timedelta(minutes=30))
    paper.close_position(inst_id=BTC, pos_side="long")  # closed on the venue by hand: no reason given, no order of ours
    trade = Trade.objects.get(pk=account_sync(exchange=paper).closed_trade_ids[0])
    assert trade.exit_reason == "signal"


def test_a_closed_trade_keeps_the_indicators_its_close_decision_saw(paper: PaperExchange) -> None:
    open_trade(paper)
    paper.set_price(BTC, D("51000"), T0 + timedelta(minutes=30))
    close = approve(decision("CLOSE"), last="51000", positions=paper.positions(), cycle_id=2)
    at_close = {"1H": {"rsi_14": 71.5, "close": 51000.0}, "4H": {"rsi_14": 66.0}}
    order_place(approved=close, cycle_id=None, exchange=paper, trade_context={**CONTEXT, "indicators_entry": at_close})
    trade = Trade.objects.get()
    assert trade.indicators_entry == {"rsi": 55} and trade.indicators_exit == at_close


def test_a_stop_out_takes_the_indicators_of_the_last_full_snapshot_if_recent(paper: PaperExchange) -> None:
    from journal.models import Cycle
    from market.models import Instrument
    from tests.brain.factories import snapshot

    btc = Instrument.objects.get(inst_id=BTC)
    stop_at = T0 + timedelta(hours=1)
    # Newest first: a compact one (ended at screening) is passed over for the full one before it.
    full = snapshot(price=49200.0, ts=stop_at - timedelta(minutes=10), inst_id=BTC).as_jsonable()
    Cycle.objects.create(instrument=btc, as_of=stop_at - timedelta(minutes=10), snapshot=full)
    Cycle.objects.create(instrument=btc, as_of=stop_at - timedelta(minutes=5), snapshot={"compact": True, "price": "49150"})
    Cycle.objects.create(instrument=btc, as_of=stop_at - timedelta(minutes=5), snapshot=full, mode="replay", run_id="r1")
    open_trade(paper)
    # An earlier REDUCE of ours: its decision's indicators are not the market at the stop.
    Order.objects.create(client_order_id="reduce1", exchange="paper", inst_id=BTC, action="REDUCE", side="sell",
                         pos_side="long", order_type="market", size=D("0.5"), reduce_only=True, state=OrderState.FILLED,
                         trade_context={"indicators_entry": {"1H": {"rsi_14": 1.0}}})
    paper.process_bar(BTC, bar(stop_at, 50000, 50100, 48900, 49100))
    trade = Trade.objects.get(pk=account_sync(exchange=paper).closed_trade_ids[0])
    assert trade.exit_reason == "stop_loss"
    assert trade.indicators_exit == {tf: view["indicators"] for tf, view in full["timeframes"].items()}
    assert trade.indicators_exit["1H"]["close"] == 49200.0


def test_a_stop_out_with_no_recent_snapshot_leaves_the_exit_indicators_unknown(paper: PaperExchange) -> None:
    from journal.models import Cycle
    from market.models import Instrument
    from tests.brain.factories import snapshot

    btc = Instrument.objects.get(inst_id=BTC)
    stale = T0 + timedelta(minutes=20)  # 40 minutes before the stop
    Cycle.objects.create(instrument=btc, as_of=stale, snapshot=snapshot(price=49800.0, ts=stale, inst_id=BTC).as_jsonable())
    open_trade(paper)
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 50000, 50100, 48900, 49100))
    trade = Trade.objects.get(pk=account_sync(exchange=paper).closed_trade_ids[0])
    assert trade.exit_reason == "stop_loss" and trade.indicators_exit is None


def test_flatten_closes_everything_and_cancels_the_tp_sl(paper: PaperExchange) -> None:
    open_trade(paper)
    result = positions_flatten(exchange=paper, reason="flatten")
    assert paper.positions() == [] and result.algo_orders_canceled == 1
    assert Trade.objects.get().exit_reason == "flatten"


def test_three_losses_in_a_row_cool_the_bot_down_for_30_minutes(db: None) -> None:
    for i in range(3):
        view = risk_trade_closed(pnl=D("-1"), now=T0 + timedelta(minutes=i))
    assert (view.state, view.until) == (BotStatus.COOLDOWN, T0 + timedelta(minutes=2, seconds=1800))
    assert bot_state_refresh(now=T0 + timedelta(minutes=20)).state == BotStatus.COOLDOWN
    view = bot_state_refresh(now=T0 + timedelta(minutes=33))
    assert (view.state, view.consecutive_losses) == (BotStatus.RUNNING, 0)


def test_a_win_resets_the_loss_streak(db: None) -> None:
    risk_trade_closed(pnl=D("-1"), now=T0)
    risk_trade_closed(pnl=D("-1"), now=T0)
    assert risk_trade_closed(pnl=D("2"), now=T0).consecutive_losses == 0


def test_daily_loss_halts_until_the_next_utc_day_and_the_rejection_is_stored(btc) -> None:
    risk_daily_reset(now=T0, equity=D("10000"))
    dec = decision()
    verdict = risk_gate_run(decision=dec, market=MarketRef(last=65000.0, ts=T0), account=account("9650"), positions=[], now=T0)
    assert not verdict.approved
    view = bot_state()
    assert view.state == BotStatus.HALTED and view.until == T0.replace(hour=0) + timedelta(days=1)
    rejection = RiskRejection.objects.get()
    assert {"rule": "daily_loss", "reason": dict(verdict.failures)["daily_loss"]} in rejection.failed_rules
    assert rejection.decision_json["decision"]["symbol"] == BTC and rejection.account_state["account"]["equity"] == "9650"
    next_day = T0 + timedelta(days=1)
    assert risk_daily_reset(now=next_day, equity=D("9650")).state == BotStatus.RUNNING
    assert bot_state().day_start_equity == D("9650")


def test_drawdown_is_an_emergency_halt_only_a_person_lifts(btc) -> None:
    risk_daily_reset(now=T0, equity=D("12000"))
    risk_daily_reset(now=T0 + timedelta(days=1), equity=D("10700"))
    risk_gate_run(decision=decision(), market=MarketRef(last=65000.0), account=account("10700"), positions=[], now=T0 + timedelta(days=1))
    assert bot_state().state == BotStatus.EMERGENCY_HALT
    assert bot_state_refresh(now=T0 + timedelta(days=5)).state == BotStatus.EMERGENCY_HALT
    assert risk_daily_reset(now=T0 + timedelta(days=6), equity=D("10700")).state == BotStatus.EMERGENCY_HALT
    with pytest.raises(ValueError):
        bot_resume(by="system")
    view = bot_resume(by="alice")
    assert view.state == BotStatus.RUNNING and view.by == "alice"


def test_a_person_can_halt_and_resume(db: None) -> None:
    assert bot_halt(reason="maintenance", by="bob").state == BotStatus.HALTED
    assert bot_state().until is None  # a person's halt does not lift itself
    assert bot_resume(by="bob").state == BotStatus.RUNNING


def test_account_state_carries_day_start_and_peak(paper: PaperExchange) -> None:
    open_trade(paper)
    account_sync(exchange=paper)
    state = account_state(exchange=paper)
    assert state.peak_equity == state.equity == state.day_start_equity


def test_the_peak_only_ever_rises(db: None) -> None:
    risk_daily_reset(now=T0, equity=Decimal("1000"))
    assert bot_peak_raise(equity=Decimal("1100")) is True
    assert bot_peak_raise(equity=Decimal("1050")) is False  # lower: the peak stays
    assert bot_peak_raise(equity=Decimal("1100")) is False  # equal: nothing to write
    assert bot_state().peak_equity == Decimal("1100")


def test_order_states_only_move_along_the_transitions_table() -> None:
    order = Order(state=OrderState.PENDING)
    transition(order, OrderState.SUBMITTED, table=ORDER_TRANSITIONS, now=T0)
    transition(order, OrderState.FILLED, table=ORDER_TRANSITIONS, now=T0)
    with pytest.raises(InvalidTransition):
        transition(order, OrderState.CANCELED, table=ORDER_TRANSITIONS, now=T0)
    with pytest.raises(InvalidTransition):
        transition(Order(state=OrderState.REJECTED), OrderState.SUBMITTED, table=ORDER_TRANSITIONS, now=T0)


def test_an_unknown_placement_outcome_leaves_the_order_pending_and_never_sends_twice(btc) -> None:
    from tests.fakes.http_server import FakeHttpServer, Reply
    from tests.fakes.okx_trade_server import ORDER, OkxTradeFake
    from execution.exchanges.okx import OkxExchange

    with FakeHttpServer() as server:
        fake = OkxTradeFake(server)
        server.route("GET", ORDER, Reply(503, {"code": "50001", "msg": "busy", "data": []}))
        fake.place_script.append(("slow", 1.0))
        okx = OkxExchange(api_key="k" * 8, api_secret="s" * 8, passphrase="p" * 8, base_url=server.url, timeout=0.3,
                          max_retries=1, backoff=0, sleep=lambda _: None)
        approved = approve(decision(), last="65000")
        order = order_place(approved=approved, cycle_id=None, exchange=okx)
        assert order.state == OrderState.PENDING and "unknown" in order.error_message
        # Later the lookup works: the order is found, not re-sent.
        server.route("GET", ORDER, fake._get)
        order = order_place(approved=approved, cycle_id=None, exchange=okx)
        assert order.state == OrderState.FILLED
        assert len(server.calls("POST", ORDER)) == 1 and Trade.objects.count() == 1


def test_the_account_sync_task_reconciles_through_the_configured_exchange(paper: PaperExchange) -> None:
    from execution.tasks import account_sync_task

    open_trade(paper)
    result = account_sync_task.apply().get()
    assert result["equity"] == str(paper.account().equity)


def test_positions_views_are_plain_values(paper: PaperExchange) -> None:
    open_trade(paper)
    (pos,) = paper.positions()
    assert isinstance(pos, Position) and pos.stop_loss == D("49000") and pos.take_profit == D("52000")


def test_a_replay_has_its_own_bot_state_and_never_halts_the_live_bot(btc) -> None:
    from execution.selectors import bot_scope

    scope = bot_scope(mode="replay", run_id="r1")
    risk_daily_reset(now=T0, equity=D("10000"), scope=scope)
    risk_gate_run(decision=decision(), market=MarketRef(last=65000.0), account=account("9650"), positions=[],
                  mode="replay", run_id="r1", now=T0)
    assert bot_state(scope=scope).state == BotStatus.HALTED
    assert bot_state().state == BotStatus.RUNNING
    for _ in range(3):
        risk_trade_closed(pnl=D("-1"), now=T0, scope=scope)
    assert bot_state().consecutive_losses == 0


def test_outside_any_transaction_the_same_approved_order_is_still_sent_once(transactional_db) -> None:  # noqa: ANN001
    """A worker writes the Order intent in autocommit (no savepoint): a second delivery still finds it, never re-sends."""
    from django.db import connection

    from market.models import Instrument

    Instrument.objects.create(inst_id=BTC, ct_val=D("0.01"), lot_sz=D("0.01"), min_sz=D("0.01"), tick_sz=D("0.1"),
                              max_lever=D("100"), trading_enabled=True)
    paper = PaperExchange(start_balance=D("10000"), slippage=D("0.0005"), taker_fee=D("0.0005"), maker_fee=D("0.0002"))
    paper.set_price(BTC, D("50000"), T0)
    approved = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    assert not connection.in_atomic_block
    first = order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    second = order_place(approved=approved, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    assert first.pk == second.pk and second.state == OrderState.FILLED and Order.objects.count() == 1
    assert PaperOrder.objects.count() == 1 and Trade.objects.count() == 1 and len(paper.positions()) == 1


def test_an_add_fill_extends_the_open_trade_and_a_repeated_fill_is_not_journaled_twice(paper: PaperExchange) -> None:
    from execution.exchanges.base import ExchangeOrder
    from execution.services import trade_open_record

    first = open_trade(paper)  # 1 contract at 50025
    paper.set_price(BTC, D("51000"), T0 + timedelta(minutes=5))
    more = approve(decision(size_pct=0.005, stop_loss=50000.0, take_profit=53000.0), last="51000", equity="100000",
                   positions=paper.positions(), cycle_id=2)
    added = order_place(approved=more, cycle_id=None, trade_context=CONTEXT, exchange=paper)
    assert added.state == OrderState.FILLED and added.client_order_id != first.client_order_id
    trade = Trade.objects.get()  # one trade: the fill added to it
    total = D("1") + added.filled_size
    assert trade.size == total and trade.client_order_id == first.client_order_id
    weighted = (D("50025") * D("1") + added.avg_fill_price * added.filled_size) / total
    assert abs(trade.entry_price - weighted) < D("1e-9")  # stored at the column's 10 places
    assert trade.stop_loss == D("50000")
    # The first fill reported again (a redelivery): found by its client order id, nothing changes.
    again = trade_open_record(order=first, fill=ExchangeOrder(
        client_order_id=first.client_order_id, order_id="x", inst_id=BTC, state="filled", size=D("1"), filled_size=D("1"),
        avg_px=D("50025"), fee=D("0"), ts=T0), context=CONTEXT)
    assert again.pk == trade.pk
    trade.refresh_from_db()
    assert trade.size == total and Trade.objects.count() == 1
