"""OKX v5 trading endpoints on a FakeHttpServer: a small stateful OKX.

It keeps the orders it accepted (by clOrdId), positions, the balance body and the
positions history, and answers in OKX's v5 shapes (numbers as strings, top-level
`code`, per-row `sCode`/`sMsg`). Placement can be scripted per call:
`"ok"`, `("slow", seconds)` (the order is ACCEPTED, the answer comes late: a client
timeout whose order exists) or `("fail", Reply)` (not accepted; this reply is sent).

Positions history pages like OKX's GET /api/v5/account/positions-history: newest
first by uTime, `limit` rows (OKX's default and maximum: 100; this fake refuses
any other value with 51000, so a client asking for more fails loudly) plus the
rows sharing the last row's uTime, `after=<ms>` for the rows strictly older
(`before` is not modelled and is refused the same way). `history_honours_after = False` makes it ignore the cursor (the
same first page every time), for clients that must not loop on it.
"""
from __future__ import annotations

import itertools
from collections import deque
from decimal import Decimal
from typing import Any

from tests.fakes.http_server import FakeHttpServer, Received, Reply

API = "/api/v5"
ORDER = f"{API}/trade/order"
CLOSE_POSITION = f"{API}/trade/close-position"
CANCEL_ORDER = f"{API}/trade/cancel-order"
ALGO_PENDING = f"{API}/trade/orders-algo-pending"
CANCEL_ALGOS = f"{API}/trade/cancel-algos"
SET_LEVERAGE = f"{API}/account/set-leverage"
POSITIONS = f"{API}/account/positions"
BALANCE = f"{API}/account/balance"
POSITIONS_HISTORY = f"{API}/account/positions-history"


def ok(data: list[dict[str, Any]]) -> Reply:
    return Reply(200, {"code": "0", "msg": "", "data": data})


def order_failure(cl_ord_id: str, s_code: str, s_msg: str) -> Reply:
    """OKX's failed-order envelope: top-level code "1", the reason in data[0]."""
    return Reply(200, {"code": "1", "msg": "All operations failed",
                       "data": [{"clOrdId": cl_ord_id, "ordId": "", "tag": "", "ts": "1695190491421", "sCode": s_code, "sMsg": s_msg}],
                       "inTime": "1695190491421339", "outTime": "1695190491423240"})


class OkxTradeFake:
    def __init__(self, server: FakeHttpServer, *, fill_px: str = "65000.0") -> None:
        self.server = server
        self.fill_px = fill_px
        self.orders: dict[str, dict[str, Any]] = {}
        self.positions: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.algos: list[dict[str, Any]] = []
        self.balance: dict[str, Any] = {"code": "0", "msg": "", "data": [{"totalEq": "10000", "details": [
            {"ccy": "USDT", "eq": "10000", "availBal": "9000", "frozenBal": "1000", "upl": "0", "cashBal": "10000"}]}]}
        self.place_script: deque[Any] = deque()
        self._ids = itertools.count(680800019749904384)
        server.route("POST", ORDER, self._place)
        server.route("GET", ORDER, self._get)
        server.route("POST", SET_LEVERAGE, self._leverage)
        server.route("POST", CLOSE_POSITION, self._close)
        server.route("POST", CANCEL_ORDER, self._cancel)
        server.route("GET", POSITIONS, lambda r: ok(self.positions))
        server.route("GET", BALANCE, lambda r: Reply(200, self.balance))
        self.history_honours_after = True
        server.route("GET", POSITIONS_HISTORY, self._history)
        server.route("GET", ALGO_PENDING, lambda r: ok([a for a in self.algos if a.get("ordType") == r.query.get("ordType")]))
        server.route("POST", CANCEL_ALGOS, self._cancel_algos)

    def _accept(self, body: dict[str, Any]) -> dict[str, Any]:
        row = {
            "instId": body["instId"], "clOrdId": body.get("clOrdId", ""), "ordId": str(next(self._ids)), "side": body["side"],
            "posSide": body.get("posSide", "net"), "ordType": body["ordType"], "sz": body["sz"], "px": body.get("px", ""),
            "tdMode": body["tdMode"], "state": "filled", "accFillSz": body["sz"], "avgPx": self.fill_px, "fillPx": self.fill_px,
            "fee": "-0.325", "feeCcy": "USDT", "reduceOnly": body.get("reduceOnly", "false"),
            "attachAlgoOrds": body.get("attachAlgoOrds") or [], "cTime": "1746947317401", "uTime": "1746947317402",
        }
        self.orders[row["clOrdId"]] = row
        return row

    def _place(self, req: Received) -> Reply:
        body = req.json()
        step = self.place_script.popleft() if self.place_script else "ok"
        if isinstance(step, tuple) and step[0] == "fail":
            return step[1]
        row = self._accept(body)
        ack = ok([{"clOrdId": row["clOrdId"], "ordId": row["ordId"], "tag": "", "ts": "1695190491421", "sCode": "0", "sMsg": ""}])
        if isinstance(step, tuple) and step[0] == "slow":
            ack.delay = step[1]
        return ack

    def _history(self, req: Received) -> Reply:
        try:
            limit = int(req.query.get("limit", "100"))
            after = int(req.query["after"]) if "after" in req.query and self.history_honours_after else None
        except ValueError:
            return Reply(200, {"code": "51000", "msg": "Parameter limit or after error", "data": []})
        if not 1 <= limit <= 100:
            return Reply(200, {"code": "51000", "msg": "Parameter limit error", "data": []})
        if "before" in req.query:  # not modelled here: refuse rather than answer as if it were honoured
            return Reply(200, {"code": "51000", "msg": "Parameter before error (not supported by this fake)", "data": []})
        rows = sorted(self.history, key=lambda r: int(r["uTime"]), reverse=True)
        if after is not None:
            rows = [r for r in rows if int(r["uTime"]) < after]
        page = rows[:limit]
        # OKX: "All records that have the same uTime will be returned at the current request".
        page += [r for r in rows[limit:] if page and r["uTime"] == page[-1]["uTime"]]
        return ok(page)

    def _get(self, req: Received) -> Reply:
        row = self.orders.get(req.query.get("clOrdId", ""))
        if row is None:
            return Reply(200, {"code": "51603", "msg": "Order does not exist.", "data": []})
        return ok([row])

    def _leverage(self, req: Received) -> Reply:
        body = req.json()
        return ok([{"lever": body["lever"], "mgnMode": body["mgnMode"], "instId": body.get("instId", ""), "posSide": body.get("posSide", "")}])

    def _close(self, req: Received) -> Reply:
        body = req.json()
        match = [p for p in self.positions if p["instId"] == body["instId"] and p["posSide"] == body.get("posSide", "net")]
        if not match:
            return Reply(200, {"code": "51023", "msg": "Position does not exist", "data": []})
        pos = match[0]
        self.positions.remove(pos)
        if body.get("clOrdId"):
            self._accept({"instId": body["instId"], "clOrdId": body["clOrdId"], "side": "sell" if pos["posSide"] == "long" else "buy",
                          "posSide": pos["posSide"], "ordType": "market", "sz": pos["pos"], "tdMode": body["mgnMode"], "reduceOnly": "true"})
        return ok([{"instId": body["instId"], "posSide": body.get("posSide", ""), "clOrdId": body.get("clOrdId", ""), "tag": ""}])

    def _cancel(self, req: Received) -> Reply:
        body = req.json()
        row = self.orders.get(body.get("clOrdId", ""))
        if row is None or row["state"] != "live":
            return Reply(200, {"code": "1", "msg": "", "data": [{"clOrdId": body.get("clOrdId", ""), "ordId": "", "sCode": "51400",
                                                                  "sMsg": "Order cancellation failed as the order has been filled, canceled or does not exist."}]})
        row["state"] = "canceled"
        return ok([{"clOrdId": row["clOrdId"], "ordId": row["ordId"], "sCode": "0", "sMsg": ""}])

    def _cancel_algos(self, req: Received) -> Reply:
        ids = {item["algoId"] for item in req.json()}
        self.algos = [a for a in self.algos if a["algoId"] not in ids]
        return ok([{"algoId": i, "sCode": "0", "sMsg": ""} for i in sorted(ids)])


def history_row(*, pos_id: str, u_time_ms: int, c_time_ms: int | None = None, inst_id: str = "BTC-USDT-SWAP",
                pos_side: str = "long", close_type: str = "2", pnl: str = "1.5") -> dict[str, Any]:
    """One positions-history row with the fields and string formats of OKX's answer (a closed isolated swap)."""
    return {
        "cTime": str(c_time_ms if c_time_ms is not None else u_time_ms - 3_600_000), "ccy": "USDT", "closeAvgPx": "65150",
        "closeTotalPos": "1", "direction": pos_side, "fee": "-0.0651", "fundingFee": "0", "instId": inst_id, "instType": "SWAP",
        "lever": "3.0", "liqPenalty": "0", "mgnMode": "isolated", "openAvgPx": "65000", "openMaxPos": "1", "pnl": pnl,
        "pnlRatio": "0.0069", "posId": pos_id, "posSide": pos_side, "triggerPx": "", "type": close_type,
        "realizedPnl": str(Decimal(pnl) - Decimal("0.0651")),  # pnl + fee + fundingFee + liqPenalty, as OKX sums it
        "uTime": str(u_time_ms), "uly": inst_id.removesuffix("-SWAP"),
    }
