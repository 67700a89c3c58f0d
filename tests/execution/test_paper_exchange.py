"""PaperExchange against hand-computed cases (BTC: ctVal 0.01, lot 0.01, tick 0.1; slippage 0.05%,
taker 0.05%, maker 0.02%, mmr 0.4%, start balance 10,000 USDT)."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from execution.exchanges.base import ExchangeRejected
from execution.exchanges.paper import PaperExchange
from execution.models import PaperAccount, PaperFill, PaperFunding, PaperPosition
from market.feeds.base import Bar
from tests.execution.helpers import BTC, T0, approve, decision

D = Decimal


def bar(ts, o, h, l, c) -> Bar:  # noqa: E741
    return Bar(ts=ts, open=D(str(o)), high=D(str(h)), low=D(str(l)), close=D(str(c)), volume=D("1"))


def assert_equity_identity(ex: PaperExchange) -> None:
    """equity = cash + unrealised PnL, with the PnL recomputed here from the positions."""
    acct = ex.account()
    upl = sum(((p.mark_px - p.avg_px) * p.size * D("0.01") * (1 if p.pos_side == "long" else -1) for p in ex.positions()), D("0"))
    assert acct.equity == acct.cash + upl


def open_long(ex: PaperExchange, *, leverage: int = 2, size_pct: float = 0.05, sl: float = 49000.0, tp: float = 52000.0, cycle: int = 1):
    ex.set_price(BTC, D("50000"), T0)
    order = approve(decision(size_pct=size_pct, leverage=leverage, stop_loss=sl, take_profit=tp), last="50000", cycle_id=cycle)
    return ex.place_order(order)


def test_a_market_buy_fills_at_last_plus_slippage_with_the_taker_fee(paper: PaperExchange) -> None:
    result = open_long(paper)
    assert result.state == "filled" and result.filled_size == D("1") and result.avg_px == D("50025.0")
    assert result.fee == D("0.250125")  # 50025 * 0.01 * 0.0005
    acct = paper.account()
    assert acct.cash == D("9999.749875")
    assert acct.margin_used == D("250.125")  # 500.25 / 2
    assert acct.unrealized_pnl == D("-0.25")  # (50000 - 50025) * 0.01
    assert acct.equity == D("9999.499875")
    assert acct.available_balance == D("9999.749875") - D("250.125")
    assert_equity_identity(paper)


def test_take_profit_fills_at_its_price_and_books_pnl_and_fee(paper: PaperExchange) -> None:
    open_long(paper)
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 50000, 52100, 49900, 52050))
    assert paper.positions() == []
    closed = paper.closed_positions()[0]
    assert (closed.close_reason, closed.close_avg_px, closed.pnl) == ("take_profit", D("52000"), D("19.75"))
    assert closed.fee == D("0.250125") + D("0.26")
    assert paper.account().cash == D("9999.749875") + D("19.75") - D("0.26")
    assert_equity_identity(paper)


def test_when_one_bar_touches_both_the_stop_fills_first(paper: PaperExchange) -> None:
    open_long(paper)
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 50000, 52100, 48900, 51000))
    closed = paper.closed_positions()[0]
    assert (closed.close_reason, closed.close_avg_px, closed.pnl) == ("stop_loss", D("49000"), D("-10.25"))
    assert paper.account().cash == D("9999.749875") - D("10.25") - D("0.245")


def test_a_gap_through_the_stop_fills_at_the_bars_open_not_the_stop(paper: PaperExchange) -> None:
    open_long(paper)
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 48500, 48700, 48000, 48600))
    closed = paper.closed_positions()[0]
    assert (closed.close_reason, closed.close_avg_px, closed.pnl) == ("stop_loss", D("48500"), D("-15.25"))
    fill = PaperFill.objects.get(kind="stop_loss")
    assert fill.price == D("48500") and fill.fee == D("0.2425")


def test_funding_is_charged_at_each_8h_boundary_at_the_price_then(paper: PaperExchange) -> None:
    open_long(paper)  # opened at 07:00
    paper.set_funding_rate(BTC, D("0.0001"))
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 50100, 50200, 50000, 50150))  # 08:00 boundary
    paper.process_bar(BTC, bar(T0 + timedelta(hours=2), 50150, 50200, 50000, 50100))  # none
    paper.process_bar(BTC, bar(T0 + timedelta(hours=9), 50200, 50300, 50100, 50200))  # 16:00 boundary
    amounts = list(PaperFunding.objects.order_by("ts").values_list("ts", "amount"))
    assert [a for _, a in amounts] == [D("-0.0501"), D("-0.0502")]  # long pays 0.01 * price * 0.0001
    assert [t.hour for t, _ in amounts] == [8, 16]
    assert paper.account().cash == D("9999.749875") - D("0.0501") - D("0.0502")
    assert_equity_identity(paper)


def test_a_bar_with_no_funding_time_writes_neither_the_position_nor_the_account(paper: PaperExchange) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    open_long(paper)  # opened at 07:00; the next funding time is 08:00
    paper.set_funding_rate(BTC, D("0.0001"))
    with CaptureQueriesContext(connection) as seen:
        paper.process_bar(BTC, bar(T0 + timedelta(minutes=30), 50000, 50100, 49950, 50050))
    writes = [q["sql"] for q in seen.captured_queries if q["sql"].startswith("UPDATE")]
    tables = (PaperPosition._meta.db_table, PaperAccount._meta.db_table)
    assert writes and not any(table in w for w in writes for table in tables), writes
    assert paper.account().cash == D("9999.749875") and not PaperFunding.objects.exists()


def test_a_short_receives_positive_funding(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    paper.set_funding_rate(BTC, D("0.0002"))
    paper.place_order(approve(decision("OPEN_SHORT", size_pct=0.05, stop_loss=51000.0, take_profit=48000.0), last="50000"))
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 50000, 50100, 49900, 50000))
    assert PaperFunding.objects.get().amount == D("0.1")  # 0.01 * 50000 * 0.0002


def test_liquidation_at_the_isolated_liquidation_price_loses_exactly_the_margin(paper: PaperExchange) -> None:
    open_long(paper, leverage=3)
    assert paper.cancel_algo_orders(inst_id=BTC) == 1  # no stop: nothing saves it
    pos = paper.positions()[0]
    margin = D("166.75")  # 500.25 / 3
    expected_liq = (D("50025.0") * D("0.01") - margin) / (D("0.01") * (1 - D("0.004")))
    assert pos.margin == margin and abs(pos.liq_px - expected_liq) < D("1e-9")
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 40000, 40000, 33400, 33500))  # below ~33483.94
    closed = paper.closed_positions()[0]
    assert closed.close_reason == "liquidation"
    assert closed.pnl - closed.liq_penalty == -margin
    assert paper.account().cash == D("9999.749875") - margin
    assert_equity_identity(paper)


def test_a_resting_limit_buy_fills_when_crossed_with_the_maker_fee(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    order = approve(decision(order_type="limit", limit_price=49500.0, size_pct=0.05, stop_loss=48600.0, take_profit=51000.0), last="50000")
    placed = paper.place_order(order)
    assert placed.state == "live" and paper.positions() == []
    assert paper.account().available_balance < D("10000")  # margin reserved
    paper.process_bar(BTC, bar(T0 + timedelta(hours=1), 49800, 49900, 49400, 49700))
    filled = paper.get_order(inst_id=BTC, client_order_id=order.client_order_id)
    assert filled.state == "filled" and filled.avg_px == D("49500")
    assert filled.fee == D("49500") * D("0.01") * filled.filled_size * D("0.0002")
    assert_equity_identity(paper)


def test_reduce_only_close_realises_pnl_and_frees_margin(paper: PaperExchange) -> None:
    open_long(paper)
    paper.set_price(BTC, D("51000"), T0 + timedelta(minutes=5))
    result = paper.close_position(inst_id=BTC, pos_side="long", client_order_id="closeit1")
    assert result.avg_px == D("50974.5")  # 51000 * (1 - 0.0005)
    assert paper.positions() == [] and paper.account().margin_used == 0
    assert paper.close_position(inst_id=BTC, pos_side="long") is None


def test_insufficient_margin_is_rejected_with_51008(btc) -> None:
    poor = PaperExchange(account_name="poor", start_balance=D("100"))
    poor.set_price(BTC, D("50000"), T0)
    with pytest.raises(ExchangeRejected) as info:
        poor.place_order(approve(decision(size_pct=0.05, leverage=1, stop_loss=49000.0, take_profit=52000.0), last="50000", equity="20000"))
    assert info.value.code == "51008"


def test_a_duplicate_client_order_id_is_refused(paper: PaperExchange) -> None:
    paper.set_price(BTC, D("50000"), T0)
    order = approve(decision(size_pct=0.05, stop_loss=49000.0, take_profit=52000.0), last="50000")
    paper.place_order(order)
    with pytest.raises(ExchangeRejected):
        paper.place_order(order)
    assert len(paper.positions()) == 1


def test_a_restart_in_the_middle_keeps_every_position_and_order(paper: PaperExchange) -> None:
    open_long(paper, size_pct=0.03)
    resting = approve(decision(order_type="limit", limit_price=49500.0, size_pct=0.01, stop_loss=48600.0, take_profit=51000.0),
                      last="50000", cycle_id=2, positions=paper.positions())
    paper.place_order(resting)
    before = (paper.positions(), paper.account(), paper.get_order(inst_id=BTC, client_order_id=resting.client_order_id), paper.now())
    restarted = PaperExchange(start_balance=D("999"))  # a new process: state comes from the database
    after = (restarted.positions(), restarted.account(), restarted.get_order(inst_id=BTC, client_order_id=resting.client_order_id), restarted.now())
    assert after == before
    restarted.process_bar(BTC, bar(T0 + timedelta(hours=1), 49800, 49900, 49400, 49700))
    assert restarted.get_order(inst_id=BTC, client_order_id=resting.client_order_id).state == "filled"
    assert restarted.positions()[0].size == D("0.80")  # 0.6 contracts + 0.2 added (100 USDT / 49500 / 0.01 -> 0.20)
    assert_equity_identity(restarted)


def test_equity_identity_holds_at_every_step_of_a_random_walk(paper: PaperExchange) -> None:
    import random

    rng = random.Random(3)
    open_long(paper, sl=48600.0, tp=53000.0)
    price = D("50000")
    paper.set_funding_rate(BTC, D("0.0001"))
    for i in range(1, 40):
        o = price
        c = (o * D(str(1 + rng.uniform(-0.004, 0.004)))).quantize(D("0.1"))
        paper.process_bar(BTC, bar(T0 + timedelta(hours=i), o, max(o, c) + 20, min(o, c) - 20, c))
        price = c
        assert_equity_identity(paper)


def test_a_tick_with_nothing_open_moves_the_price_but_never_the_clock_back_nor_the_funding_rate(paper: PaperExchange) -> None:
    from execution.models import PaperPrice

    paper.set_price(BTC, D("50000"), T0)
    paper.set_funding_rate(BTC, D("0.0001"))
    paper.set_price(BTC, D("50100"), T0 + timedelta(minutes=5))  # the one-UPDATE tick
    row = PaperPrice.objects.get(inst_id=BTC)
    assert (row.last, row.ts, row.funding_rate) == (D("50100"), T0 + timedelta(minutes=5), D("0.0001"))
    paper.set_price(BTC, D("49900"), T0 + timedelta(minutes=1))  # a late tick: the price moves, the clock stays
    row.refresh_from_db()
    assert (row.last, row.ts) == (D("49900"), T0 + timedelta(minutes=5)) and paper.now() == T0 + timedelta(minutes=5)
    with pytest.raises(ExchangeRejected) as info:  # an unknown instrument is still refused before anything is written
        paper.set_price("NOPE-USDT-SWAP", D("1"), T0)
    assert info.value.code == "51001" and not PaperPrice.objects.filter(inst_id="NOPE-USDT-SWAP").exists()


def test_a_tick_fills_a_resting_limit_order_and_stops_an_open_position_through_the_full_path(paper: PaperExchange) -> None:
    """The cheap tick is only for an instrument with nothing open: a resting order or a position gets every tick."""
    paper.set_price(BTC, D("50000"), T0)
    limit = approve(decision(order_type="limit", limit_price=49500.0, size_pct=0.05, stop_loss=48600.0, take_profit=51000.0),
                    last="50000")
    paper.place_order(limit)
    paper.set_price(BTC, D("49400"), T0 + timedelta(minutes=5))  # crosses the resting buy
    assert paper.get_order(inst_id=BTC, client_order_id=limit.client_order_id).state == "filled"
    assert len(paper.positions()) == 1
    paper.set_price(BTC, D("48500"), T0 + timedelta(minutes=10))  # through its stop at 48600
    assert paper.positions() == [] and paper.closed_positions()[0].close_reason == "stop_loss"
    assert_equity_identity(paper)


def test_a_workers_tick_with_nothing_open_is_one_statement_and_sees_only_its_own_account(
        paper: PaperExchange, django_assert_num_queries) -> None:
    """A worker's handle (lazy: its account not read yet) marks a flat instrument in one UPDATE; another
    account's position on the same instrument does not send it down the full path, its own does."""
    from execution.models import PaperPrice

    other = PaperExchange(account_name="other", start_balance=D("10000"))
    other.set_price(BTC, D("50000"), T0)
    other.place_order(approve(decision(size_pct=0.05, leverage=2, stop_loss=49000.0, take_profit=52000.0), last="50000",
                              cycle_id=7))
    paper.set_price(BTC, D("50000"), T0)
    worker = PaperExchange(lazy=True)  # the default account, as live_env() makes it per task
    with django_assert_num_queries(1):
        worker.set_price(BTC, D("50100"), T0 + timedelta(minutes=5))
    assert PaperPrice.objects.get(account_id=paper.account_id, inst_id=BTC).last == D("50100")
    assert PaperPrice.objects.get(account_id=other.account_id, inst_id=BTC).last == D("50000")
    open_long(paper, cycle=2)
    worker = PaperExchange(lazy=True)
    worker.set_price(BTC, D("48900"), T0 + timedelta(minutes=10))  # through the stop at 49000: the full path
    assert paper.positions() == [] and paper.closed_positions()[0].close_reason == "stop_loss"
    assert len(other.positions()) == 1


def test_the_margin_check_counts_what_resting_orders_and_open_positions_hold(btc) -> None:
    ex = PaperExchange(account_name="tight", start_balance=D("1000"), slippage=D("0"), taker_fee=D("0"), maker_fee=D("0"))
    ex.set_price(BTC, D("50000"), T0)

    def order(size_pct: float, cycle: int, **fields: float | str):  # sized by the gate on 100,000 of equity, at 1x
        base: dict = {"stop_loss": 49000.0, "take_profit": 52000.0, **fields}
        return approve(decision(size_pct=size_pct, leverage=1, **base), last="50000", equity="100000", cycle_id=cycle)

    # A resting buy of 0.2 contracts at 40000 reserves 40000 * 0.2 * 0.01 = 80.
    resting = order(0.0008, 1, order_type="limit", limit_price=40000.0, stop_loss=39000.0, take_profit=42000.0)
    assert resting.size == D("0.2") and ex.place_order(resting).state == "live"
    # A market long of 1.6 contracts holds 800 of margin: 1000 - 80 - 800 = 120 left.
    first = order(0.008, 2)
    assert first.size == D("1.6") and ex.place_order(first).state == "filled"
    assert ex.account().available_balance == D("120")
    # 0.3 contracts need 150 > 120: refused on what the resting order and the position hold.
    over = order(0.0015, 3)
    with pytest.raises(ExchangeRejected) as info:
        ex.place_order(over)
    assert info.value.code == "51008" and "available 120" in str(info.value)
    # 0.2 contracts need 100 <= 120: it fills and adds to the open long (one position, the sizes summed).
    fits = order(0.001, 4)
    assert ex.place_order(fits).state == "filled"
    assert [(p.pos_side, p.size) for p in ex.positions()] == [("long", D("1.8"))]
    assert ex.account().available_balance == D("20")
