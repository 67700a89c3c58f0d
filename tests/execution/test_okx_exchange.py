"""OkxExchange through python-okx against a local OKX v5 fake on 127.0.0.1 (real sockets)."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
from django.test import override_settings

from execution.exchanges.base import ExchangeRejected, ExchangeTemporaryError, ExchangeUnknownOutcome, LiveTradingRefused, UnapprovedOrder
from execution.exchanges.okx import OkxExchange
from tests.execution.helpers import BTC, approve, decision
from tests.fakes.http_server import FakeHttpServer, Reply
from tests.fakes.okx_trade_server import (
    BALANCE,
    CLOSE_POSITION,
    ORDER,
    POSITIONS,
    POSITIONS_HISTORY,
    SET_LEVERAGE,
    OkxTradeFake,
    history_row,
    order_failure,
)

D = Decimal


@pytest.fixture(scope="module")
def server():
    with FakeHttpServer() as running:  # one server per module: shutting one down takes ~0.5 s
        yield running


@pytest.fixture
def okx(server: FakeHttpServer) -> OkxTradeFake:
    with server._lock:
        server._routes.clear()
        server.requests.clear()
    return OkxTradeFake(server)


def exchange(fake: OkxTradeFake, **kw) -> OkxExchange:
    options = dict(api_key="k" * 10, api_secret="s" * 10, passphrase="p" * 10, base_url=fake.server.url, timeout=2.0,
                   max_retries=3, backoff=0.0, sleep=lambda _: None)
    options.update(kw)
    return OkxExchange(**options)


def an_order(**fields):
    return approve(decision(**fields), last="65000")


def test_set_leverage_sends_isolated_instrument_and_side_with_the_demo_header(okx: OkxTradeFake) -> None:
    exchange(okx).set_leverage(inst_id=BTC, leverage=D("2"), pos_side="long")
    (req,) = okx.server.calls("POST", SET_LEVERAGE)
    assert req.headers["x-simulated-trading"] == "1"
    assert req.json() == {"lever": "2", "mgnMode": "isolated", "instId": BTC, "ccy": "", "posSide": "long"}


def test_an_order_carries_the_right_fields_and_attached_tp_sl(okx: OkxTradeFake) -> None:
    order = an_order()
    result = exchange(okx).place_order(order)
    (req,) = okx.server.calls("POST", ORDER)
    body = req.json()
    assert req.headers["x-simulated-trading"] == "1"
    assert {k: body[k] for k in ("instId", "tdMode", "side", "posSide", "ordType", "sz", "clOrdId")} == {
        "instId": BTC, "tdMode": "isolated", "side": "buy", "posSide": "long", "ordType": "market", "sz": "0.61",
        "clOrdId": order.client_order_id}
    assert body["attachAlgoOrds"] == [{"tpTriggerPx": "67600", "tpOrdPx": "-1", "tpTriggerPxType": "last",
                                       "slTriggerPx": "63700", "slOrdPx": "-1", "slTriggerPxType": "last"}]
    assert (result.state, result.filled_size, result.avg_px, result.fee) == ("filled", D("0.61"), D("65000.0"), D("0.325"))


def test_a_short_limit_order_sends_sell_short_and_its_price(okx: OkxTradeFake) -> None:
    order = approve(decision("OPEN_SHORT", order_type="limit", limit_price=65500.0, stop_loss=66800.0, take_profit=63000.0), last="65000")
    exchange(okx).place_order(order)
    body = okx.server.calls("POST", ORDER)[0].json()
    assert (body["side"], body["posSide"], body["ordType"], body["px"]) == ("sell", "short", "limit", "65500")


def test_51008_insufficient_margin_is_a_rejection_and_is_not_retried(okx: OkxTradeFake, okx_samples: Path) -> None:
    templates = json.loads((okx_samples / "error_codes.okxdoc.json").read_text())["51008"]
    message = templates[1]["Error Message"].replace("{param0}", "USDT")  # "Order failed. Insufficient USDT margin in account"
    order = an_order()
    okx.place_script.append(("fail", order_failure(order.client_order_id, "51008", message)))
    with pytest.raises(ExchangeRejected) as info:
        exchange(okx).place_order(order)
    assert info.value.code == "51008" and "Insufficient USDT margin" in str(info.value)
    assert len(okx.server.calls("POST", ORDER)) == 1 and okx.orders == {}


def test_http_429_rate_limit_is_temporary_and_retried(okx: OkxTradeFake, okx_samples: Path) -> None:
    body = json.loads((okx_samples / "error_http429_rate_limit.nautilus_fixture.json").read_text())
    okx.server.route("GET", POSITIONS, Reply(429, body), Reply(200, {"code": "0", "msg": "", "data": []}))
    assert exchange(okx).positions() == []
    assert len(okx.server.calls("GET", POSITIONS)) == 2


def test_a_non_json_5xx_is_temporary_and_gives_up_after_the_retries(okx: OkxTradeFake) -> None:
    okx.server.route("GET", POSITIONS, Reply(502, "<html>Bad Gateway</html>"))
    with pytest.raises(ExchangeTemporaryError):
        exchange(okx, max_retries=2).positions()
    assert len(okx.server.calls("GET", POSITIONS)) == 3


def test_an_invalid_key_is_a_rejection(okx: OkxTradeFake, okx_samples: Path) -> None:
    body = json.loads((okx_samples / "error_http401_invalid_access_key.nautilus_fixture.json").read_text())
    okx.server.route("GET", BALANCE, Reply(401, body))
    with pytest.raises(ExchangeRejected) as info:
        exchange(okx).account()
    assert info.value.code == "50111" and len(okx.server.calls("GET", BALANCE)) == 1


def test_a_placement_that_times_out_and_is_retried_produces_exactly_one_order(okx: OkxTradeFake) -> None:
    order = an_order()
    okx.place_script.append(("slow", 1.5))  # OKX accepts the order but answers after our timeout
    result = exchange(okx, timeout=0.5).place_order(order)
    assert len(okx.server.calls("POST", ORDER)) == 1  # looked up by clOrdId instead of sending it again
    assert list(okx.orders) == [order.client_order_id]
    assert result.client_order_id == order.client_order_id and result.state == "filled"
    lookups = okx.server.calls("GET", ORDER)
    assert lookups and lookups[0].query["clOrdId"] == order.client_order_id


def test_a_placement_that_failed_temporarily_is_resent_only_after_a_lookup_finds_nothing(okx: OkxTradeFake) -> None:
    order = an_order()
    okx.place_script.append(("fail", Reply(503, {"code": "50001", "msg": "Service temporarily unavailable", "data": []})))
    exchange(okx).place_order(order)
    assert len(okx.server.calls("POST", ORDER)) == 2 and len(okx.orders) == 1
    methods = [(r.method, r.path) for r in okx.server.requests if r.path == ORDER]
    assert methods[:3] == [("POST", ORDER), ("GET", ORDER), ("POST", ORDER)]


def test_an_outcome_that_stays_unknown_is_reported_as_such(okx: OkxTradeFake) -> None:
    okx.server.route("GET", ORDER, Reply(503, {"code": "50001", "msg": "busy", "data": []}))
    okx.place_script.extend([("slow", 1.0)] * 5)
    with pytest.raises(ExchangeUnknownOutcome):
        exchange(okx, timeout=0.3, max_retries=1).place_order(an_order())
    assert len(okx.server.calls("POST", ORDER)) == 1  # never re-sent blind


def test_order_lookup_by_client_order_id(okx: OkxTradeFake) -> None:
    ex = exchange(okx)
    assert ex.get_order(inst_id=BTC, client_order_id="nosuchorder") is None
    order = an_order()
    ex.place_order(order)
    found = ex.get_order(inst_id=BTC, client_order_id=order.client_order_id)
    assert (found.inst_id, found.state, found.pos_side) == (BTC, "filled", "long")


def test_positions_and_balance_are_parsed_from_okx_bodies(okx: OkxTradeFake, okx_samples: Path) -> None:
    okx.positions = json.loads((okx_samples / "account_positions.nautilus_fixture_SYNTHETIC.json").read_text())["data"]
    okx.balance = json.loads((okx_samples / "account_balance.nautilus_fixture.json").read_text())
    ex = exchange(okx)
    (pos,) = ex.positions()
    assert (pos.inst_id, pos.pos_side, pos.size, pos.avg_px, pos.notional_usd, pos.leverage, pos.liq_px) == (
        BTC, "long", D("0.5"), D("10000"), D("5000"), D("10.0"), D("9000"))
    acct = ex.account()
    assert acct.equity == D("99.89469657000001") and acct.available_balance == D("94.42612990333333")
    assert acct.unrealized_pnl == D("-0.0273000000000002")


def test_close_position_is_reduce_only_for_the_side_and_none_when_flat(okx: OkxTradeFake, okx_samples: Path) -> None:
    okx.positions = json.loads((okx_samples / "account_positions.nautilus_fixture_SYNTHETIC.json").read_text())["data"]
    ex = exchange(okx)
    closed = ex.close_position(inst_id=BTC, pos_side="long", client_order_id="tbclose1")
    body = okx.server.calls("POST", CLOSE_POSITION)[0].json()
    assert (body["instId"], body["mgnMode"], body["posSide"], body["clOrdId"]) == (BTC, "isolated", "long", "tbclose1")
    assert closed.state == "filled"
    assert ex.close_position(inst_id=BTC, pos_side="long") is None


T0_MS = 1_746_947_317_000  # the newest close in the histories below (2025-05-11)


def closes(n: int, *, tie_at: int | None = None) -> list[dict]:
    """`n` closed positions a minute apart, newest first; with `tie_at`, that row shares the uTime of the one before."""
    rows = [history_row(pos_id=f"pos{i:04d}", u_time_ms=T0_MS - i * 60_000) for i in range(n)]
    if tie_at is not None:
        rows[tie_at]["uTime"] = rows[tie_at - 1]["uTime"]
    return rows


def history_queries(fake: OkxTradeFake) -> list[dict[str, str]]:
    return [r.query for r in fake.server.calls("GET", POSITIONS_HISTORY)]


def test_closed_positions_are_read_page_by_page_and_each_close_comes_once(okx: OkxTradeFake) -> None:
    # 230 closes; rows 99 and 100 share a uTime, so OKX's first page has 101 rows (it never splits a uTime).
    okx.history = closes(230, tie_at=100)
    sleeps: list[float] = []
    closed = exchange(okx, sleep=sleeps.append).closed_positions()
    assert sorted(c.pos_id for c in closed) == sorted(r["posId"] for r in okx.history)  # all 230, none twice
    assert [c.closed_at for c in closed] == sorted(c.closed_at for c in closed)
    queries = history_queries(okx)
    assert [q.get("limit") for q in queries] == ["100", "100", "100"]
    # Each page asks for the closes older than the oldest one it has: 101 rows, then 100, then the last 29.
    assert [q.get("after") for q in queries] == [None, okx.history[100]["uTime"], okx.history[200]["uTime"]]
    assert sleeps == [0.2, 0.2]  # paced inside OKX's 10 requests per 2 s
    first = next(c for c in closed if c.pos_id == "pos0000")
    assert first.closed_at == datetime.fromtimestamp(T0_MS / 1000, tz=timezone.utc)
    assert (first.inst_id, first.pos_side, first.pnl, first.fee) == (BTC, "long", D("1.5"), D("0.0651"))


def test_paging_stops_once_the_closes_are_older_than_since(okx: OkxTradeFake) -> None:
    okx.history = closes(230)
    since = datetime.fromtimestamp(int(okx.history[40]["uTime"]) / 1000, tz=timezone.utc)
    closed = exchange(okx).closed_positions(since=since)
    assert sorted(c.pos_id for c in closed) == sorted(r["posId"] for r in okx.history[:41])
    assert len(history_queries(okx)) == 1  # the first page already reached back past `since`


def test_a_server_that_ignores_the_cursor_is_not_asked_again_and_again(
        okx: OkxTradeFake, caplog: pytest.LogCaptureFixture) -> None:
    okx.history = closes(150)
    okx.history_honours_after = False  # the same first page, whatever `after` says
    with caplog.at_level(logging.WARNING):
        closed = exchange(okx).closed_positions()
    assert len(history_queries(okx)) == 2  # the second page did not move back in time: stop
    assert sorted(c.pos_id for c in closed) == sorted(r["posId"] for r in okx.history[:100])  # each once
    assert "okx_positions_history_not_advancing" in caplog.text


def test_paging_stops_at_the_page_cap_with_a_warning(okx: OkxTradeFake, caplog: pytest.LogCaptureFixture) -> None:
    from execution.exchanges.okx import HISTORY_MAX_PAGES

    okx.history = closes(HISTORY_MAX_PAGES * 100 + 50)
    with caplog.at_level(logging.WARNING):
        closed = exchange(okx).closed_positions()
    assert len(history_queries(okx)) == HISTORY_MAX_PAGES
    assert len(closed) == len({c.pos_id for c in closed}) == HISTORY_MAX_PAGES * 100  # the newest ones
    assert "okx_positions_history_page_cap" in caplog.text


def test_real_money_is_refused_without_the_setting_and_a_persons_confirmation(okx: OkxTradeFake, db: None) -> None:
    with pytest.raises(LiveTradingRefused) as info:
        exchange(okx, demo=False)
    assert "OKX_LIVE_TRADING=true" in str(info.value) and "python manage.py bot confirm-live" in str(info.value)
    with override_settings(OKX_LIVE_TRADING=True):
        with pytest.raises(LiveTradingRefused):
            exchange(okx, demo=False)  # the setting alone is not enough
        from execution.bot import live_trading_confirm

        live_trading_confirm(by="alice")
        live = exchange(okx, demo=False)
        live.set_leverage(inst_id=BTC, leverage=D("2"), pos_side="long")
        assert okx.server.calls("POST", SET_LEVERAGE)[-1].headers["x-simulated-trading"] == "0"


def test_an_exchange_refuses_anything_but_an_approved_order(okx: OkxTradeFake) -> None:
    with pytest.raises(UnapprovedOrder):
        exchange(okx).place_order(decision())  # type: ignore[arg-type]
    assert okx.server.calls("POST", ORDER) == []


def test_a_duplicate_client_order_id_answer_reports_the_order_okx_already_has(okx: OkxTradeFake) -> None:
    order = an_order()
    okx._accept({"instId": BTC, "clOrdId": order.client_order_id, "side": "buy", "posSide": "long", "ordType": "market",
                 "sz": "0.61", "tdMode": "isolated"})
    okx.place_script.append(("fail", order_failure(order.client_order_id, "51016", "Duplicated clOrdId")))
    result = exchange(okx).place_order(order)
    assert result.client_order_id == order.client_order_id and len(okx.orders) == 1


def test_exchange_from_settings_picks_okx_only_with_all_three_keys(okx: OkxTradeFake, db: None) -> None:
    from execution.exchanges import exchange_from_settings
    from execution.exchanges.paper import PaperExchange

    with override_settings(OKX_API_KEY="", OKX_API_SECRET="s" * 10, OKX_PASSPHRASE="p" * 10):
        assert isinstance(exchange_from_settings(), PaperExchange)
    with override_settings(OKX_API_KEY="k" * 10, OKX_API_SECRET="s" * 10, OKX_PASSPHRASE="p" * 10, OKX_BASE_URL=okx.server.url):
        chosen = exchange_from_settings()
        assert isinstance(chosen, OkxExchange) and chosen.flag == "1"
        chosen.positions()
        assert okx.server.calls("GET", POSITIONS)[0].headers["x-simulated-trading"] == "1"


# --- OKX unreachable (#16) ---------------------------------------------------------------------------------------
def _closed_port() -> str:
    import socket

    with socket.socket() as s:  # bound, then closed: nothing listens there, a connect is refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_okx_fails_at_once_without_retries_and_its_order_is_canceled_never_sent(db) -> None:
    from execution.exchanges.base import ExchangeUnreachable
    from execution.models import Order, OrderState
    from execution.outages import exchange_outage_began
    from execution.services import order_place
    from journal.models import JournalEvent

    slept: list[float] = []
    ex = OkxExchange(api_key="k" * 10, api_secret="s" * 10, passphrase="p" * 10, base_url=_closed_port(), timeout=2.0,
                     max_retries=3, backoff=0.5, sleep=slept.append)
    with pytest.raises(ExchangeUnreachable, match="OKX connection failed"):
        ex.positions()
    with pytest.raises(ExchangeUnreachable):
        ex.place_order(an_order())
    assert slept == []  # no backoff: the stage fails fast and the next tick is not held back
    order = order_place(approved=an_order(), cycle_id=None, exchange=ex)
    assert order.state == OrderState.CANCELED and "exchange unreachable, never sent" in order.error_message
    assert Order.objects.get().state == OrderState.CANCELED  # nothing can send it late
    order_place(approved=an_order(stop_loss=63600.0), cycle_id=None, exchange=ex)
    events = JournalEvent.objects.filter(kind="exchange_unreachable")
    assert events.count() == 1 and "protected by their exchange-side stops" in events.get().message  # one per outage
    assert exchange_outage_began() is not None


def test_the_first_sync_after_an_outage_verifies_every_positions_exchange_side_stop(okx: OkxTradeFake, db) -> None:
    from io import StringIO

    from django.core.management import call_command

    from execution.outages import exchange_outage_began, exchange_unreachable_record
    from execution.sync import account_sync
    from journal.models import EventLevel, JournalEvent

    def position(inst: str, sl: str | None) -> dict:
        algo = [{"algoId": "1", "tpTriggerPx": "70000", **({"slTriggerPx": sl} if sl else {})}]
        return {"instId": inst, "posSide": "long", "pos": "1", "avgPx": "65000", "notionalUsd": "650", "lever": "2",
                "upl": "0", "margin": "325", "liqPx": "", "markPx": "65000", "closeOrderAlgo": algo, "posId": inst,
                "cTime": "1746947317401"}

    assert exchange_unreachable_record(error="OKX connection failed: ConnectError", where="SCREENING")
    assert not exchange_unreachable_record(error="OKX connection failed: ConnectError", where="account sync")
    with override_settings(OKX_API_KEY="k" * 10, OKX_API_SECRET="s" * 10, OKX_PASSPHRASE="p" * 10,
                           OKX_BASE_URL=okx.server.url):
        out = StringIO()
        call_command("bot", "status", stdout=out)
        assert "exchange unreachable since" in out.getvalue() and "exchange-side stops" in out.getvalue()
    okx.positions = [position(BTC, "63000"), position("ETH-USDT-SWAP", None)]
    account_sync(exchange=exchange(okx))
    back = JournalEvent.objects.get(kind="exchange_reachable")
    assert back.level == EventLevel.ERROR
    assert "1 of 2 open position(s) have NO exchange-side stop loss: ETH-USDT-SWAP long" in back.message
    assert [p["stop_loss"] for p in back.data["positions"]] == ["63000", None]
    assert exchange_outage_began() is None
    account_sync(exchange=exchange(okx))  # no outage open: nothing more to verify
    assert JournalEvent.objects.filter(kind="exchange_reachable").count() == 1
