"""OKX v5 trading over python-okx (`Trade.TradeAPI`, `Account.AccountAPI`), demo by default.

- flag "1" makes python-okx send `x-simulated-trading: 1` (demo). Real money (flag "0") is refused
  unless settings.OKX_LIVE_TRADING is true AND a person confirmed it (`manage.py bot confirm-live`).
- Orders are isolated-margin, long/short position mode (the OKX account must be set to
  long_short_mode), with TP/SL attached through `attachAlgoOrds` (market exits, trigger on last).
- Errors: timeouts, transport errors, non-JSON bodies and 50001/50004/50011/50013/50026-type codes
  are temporary and retried with exponential backoff; everything else (51008 insufficient margin
  and the other 51xxx, auth errors) is `ExchangeRejected` and never retried. OKX reports a failed
  order as top-level code "1" with the reason in data[].sCode/sMsg. No connection at all (refused, DNS,
  no route, the connect timeout: at most CONNECT_TIMEOUT seconds) is `ExchangeUnreachable`, raised at once
  without retries: the request never left, and waiting inside a stage only held the next ticks back (#16).
- A placement whose outcome is unknown (timeout, 50004, any temporary error) is followed by a lookup
  by clOrdId BEFORE anything else; it is re-sent only when OKX says the order does not exist, so an
  order is never placed twice.
- Closed positions come from positions-history, paged (100 rows a page, `after` = the oldest uTime seen)
  back to the time asked for, with a page cap and a stop on a page that does not move back in time.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone as dt_timezone
from decimal import Decimal
from typing import Any, Callable

import httpx
from django.conf import settings
from okx import Account, Trade

from execution.exchanges.base import (
    AccountState,
    ClosedPosition,
    Exchange,
    ExchangeError,
    ExchangeOrder,
    ExchangeRejected,
    ExchangeTemporaryError,
    ExchangeUnknownOutcome,
    ExchangeUnreachable,
    LiveTradingRefused,
    Position,
)
import structlog
from redaction import redact

log = structlog.get_logger(__name__)
ZERO = Decimal("0")
CONNECT_TIMEOUT = 5.0  # seconds to open a connection (OKX answers in well under one); the other phases: `timeout`
TEMPORARY_CODES = frozenset({"50001", "50004", "50011", "50013", "50026", "50040", "50061", "51149"})
ORDER_NOT_FOUND = frozenset({"51603"})
NO_POSITION = frozenset({"51023", "51169"})
DUPLICATE_CL_ORD_ID = "51016"
# GET /api/v5/account/positions-history: at most 100 rows a page (OKX's maximum and default), 10 requests per 2 s.
HISTORY_PAGE_LIMIT = 100
HISTORY_PAGE_INTERVAL = 0.2  # seconds between pages: stays inside the rate limit
HISTORY_MAX_PAGES = 20  # 2,000 closes back; an account sync needs one page (it asks back to its oldest open trade)
LIVE_REFUSAL = (
    "Live trading with real money is refused. To allow it: set OKX_LIVE_TRADING=true and OKX_DEMO=false, "
    "then have a person run `python manage.py bot confirm-live`. Until then only OKX demo trading (OKX_DEMO=true) is used."
)


def live_trading_allowed() -> bool:
    from execution.models import LiveTradingConfirmation

    return bool(settings.OKX_LIVE_TRADING) and LiveTradingConfirmation.objects.exists()


def num(value: Any, default: Decimal = ZERO) -> Decimal:
    """OKX sends numbers as strings, sometimes ""; parse defensively."""
    if value in (None, ""):
        return default
    try:
        result = Decimal(str(value))
    except ArithmeticError:
        return default
    return result if result.is_finite() else default


def opt(value: Any) -> Decimal | None:
    return None if value in (None, "") else num(value)


def ms_to_dt(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value) / 1000, tz=dt_timezone.utc)
    except (TypeError, ValueError):
        return None


def _ms(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def fmt(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


class OkxExchange(Exchange):
    name = "okx"

    def __init__(
        self,
        *,
        api_key: str,
        api_secret: str,
        passphrase: str,
        base_url: str,
        demo: bool = True,
        timeout: float = 10.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        td_mode: str = "isolated",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.flag = "1" if demo else "0"
        self.max_retries = max_retries
        self.backoff = backoff
        self.td_mode = td_mode
        self._sleep = sleep
        self.trade = Trade.TradeAPI(api_key, api_secret, passphrase, None, self.flag, domain=base_url, debug=False)
        self.account_api = Account.AccountAPI(api_key, api_secret, passphrase, None, self.flag, domain=base_url, debug=False)
        for client in (self.trade, self.account_api):
            # python-okx sets none of its own; an unreachable host fails within the connect timeout.
            client.timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))
        self._guard_live()

    # --- plumbing --------------------------------------------------------------
    def _guard_live(self) -> None:
        if self.flag != "1" and not live_trading_allowed():
            raise LiveTradingRefused(LIVE_REFUSAL)

    def _call(self, fn: Callable[..., Any], **params: Any) -> list[dict[str, Any]]:
        """One request; OKX's answer translated into data rows or one of our exceptions."""
        try:
            body = fn(**params)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ExchangeUnreachable(redact(f"OKX connection failed: {type(exc).__name__}: {exc}"),
                                      code="unreachable") from exc
        except httpx.TimeoutException as exc:
            raise ExchangeTemporaryError(f"OKX request timed out: {type(exc).__name__}", code="timeout") from exc
        except httpx.HTTPError as exc:
            raise ExchangeTemporaryError(redact(f"OKX transport error: {exc}"), code="network") from exc
        except (json.JSONDecodeError, ValueError) as exc:
            # python-okx calls response.json() without checking the status: a gateway's HTML error page lands here.
            raise ExchangeTemporaryError(f"OKX answered with a non-JSON body: {exc}", code="bad_body") from exc
        if not isinstance(body, dict):
            raise ExchangeTemporaryError(f"OKX answered with an unexpected body: {str(body)[:200]}", code="bad_body")
        code = str(body.get("code", ""))
        msg = redact(str(body.get("msg", "")))
        data = body.get("data") if isinstance(body.get("data"), list) else []
        rows = [row for row in data if isinstance(row, dict)]
        if code == "0":
            return rows
        # code "1"/"2": the request was fine, the operation failed; the reason is per row.
        failed = [row for row in rows if str(row.get("sCode", "0")) not in ("0", "")]
        if code in ("1", "2") and failed:
            s_code, s_msg = str(failed[0].get("sCode")), redact(str(failed[0].get("sMsg", "")))
            if s_code in TEMPORARY_CODES:
                raise ExchangeTemporaryError(f"OKX {s_code}: {s_msg}", code=s_code)
            raise ExchangeRejected(f"OKX {s_code}: {s_msg}", code=s_code)
        if code in TEMPORARY_CODES:
            raise ExchangeTemporaryError(f"OKX {code}: {msg}", code=code)
        raise ExchangeRejected(f"OKX {code}: {msg or 'request failed'}", code=code)

    def _retrying(self, what: str, fn: Callable[..., Any], **params: Any) -> list[dict[str, Any]]:
        """Retry temporary errors with exponential backoff; for requests safe to repeat."""
        attempt = 0
        while True:
            try:
                return self._call(fn, **params)
            except ExchangeUnreachable:
                raise  # no connection at all: fail fast, the caller decides (see the module docstring)
            except ExchangeTemporaryError as exc:
                if attempt >= self.max_retries:
                    raise
                delay = self.backoff * (2**attempt)
                log.warning("okx_retry", what=what, attempt=attempt + 1, code=exc.code, delay=delay)
                self._sleep(delay)
                attempt += 1

    # --- orders -----------------------------------------------------------------------
    def set_leverage(self, *, inst_id: str, leverage: Decimal, pos_side: str) -> None:
        self._guard_live()
        self._retrying("set_leverage", self.account_api.set_leverage, lever=fmt(leverage), mgnMode=self.td_mode, instId=inst_id, posSide=pos_side)

    def _order_params(self, order: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "instId": order.inst_id, "tdMode": self.td_mode, "side": order.side, "ordType": order.order_type,
            "sz": fmt(order.size), "clOrdId": order.client_order_id, "posSide": order.pos_side,
        }
        if order.order_type == "limit" and order.price is not None:
            params["px"] = fmt(order.price)
        if order.reduce_only:
            params["reduceOnly"] = "true"
        algo: dict[str, str] = {}
        if order.take_profit is not None:
            algo.update(tpTriggerPx=fmt(order.take_profit), tpOrdPx="-1", tpTriggerPxType="last")
        if order.stop_loss is not None:
            algo.update(slTriggerPx=fmt(order.stop_loss), slOrdPx="-1", slTriggerPxType="last")
        if algo:
            params["attachAlgoOrds"] = [algo]
        return params

    def _place_order(self, order: Any) -> ExchangeOrder:
        self._guard_live()
        params = self._order_params(order)
        may_exist = False
        last_error: ExchangeError | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self.backoff * (2 ** (attempt - 1)))
            if may_exist:
                # The previous attempt may have reached OKX: look before sending again.
                try:
                    found = self._get_order_once(inst_id=order.inst_id, client_order_id=order.client_order_id)
                except ExchangeTemporaryError as exc:
                    last_error = exc
                    continue
                if found is not None:
                    log.info("okx_order_found_after_unknown_outcome", clOrdId=order.client_order_id, state=found.state)
                    return found
            try:
                rows = self._call(self.trade.place_order, **params)
            except ExchangeRejected as exc:
                if exc.code != DUPLICATE_CL_ORD_ID:
                    raise
                # OKX already has this clOrdId (an earlier attempt landed after all): report that order.
                found = self._get_order_once(inst_id=order.inst_id, client_order_id=order.client_order_id)
                if found is None:
                    raise
                return found
            except ExchangeUnreachable:
                if not may_exist:
                    raise  # not even a connection: this order never left, nothing to look up (a retry is the stage's)
                continue  # an earlier attempt may have landed: still unknown, look again on the next attempt
            except ExchangeTemporaryError as exc:
                log.warning("okx_place_unknown_outcome", clOrdId=order.client_order_id, code=exc.code)
                may_exist, last_error = True, exc
                continue
            ack = rows[0] if rows else {}
            order_id = str(ack.get("ordId", ""))
            try:
                detail = self._get_order_once(inst_id=order.inst_id, client_order_id=order.client_order_id)
            except ExchangeError:
                detail = None
            return detail or ExchangeOrder(
                client_order_id=order.client_order_id, order_id=order_id, inst_id=order.inst_id, state="live",
                size=order.size, ts=ms_to_dt(ack.get("ts")), side=order.side, pos_side=order.pos_side,
            )
        raise ExchangeUnknownOutcome(
            f"placement of {order.client_order_id} has an unknown outcome after {self.max_retries + 1} attempts ({last_error}); "
            "look it up by clOrdId before doing anything else",
            code=last_error.code if last_error else "",
        )

    def _get_order_once(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None:
        try:
            rows = self._call(self.trade.get_order, instId=inst_id, clOrdId=client_order_id)
        except ExchangeRejected as exc:
            if exc.code in ORDER_NOT_FOUND:
                return None
            raise
        return self._parse_order(rows[0]) if rows else None

    @staticmethod
    def _parse_order(row: dict[str, Any]) -> ExchangeOrder:
        return ExchangeOrder(
            client_order_id=str(row.get("clOrdId", "")), order_id=str(row.get("ordId", "")), inst_id=str(row.get("instId", "")),
            state=str(row.get("state", "")), size=num(row.get("sz")), filled_size=num(row.get("accFillSz")),
            avg_px=opt(row.get("avgPx")), fee=-num(row.get("fee")), ts=ms_to_dt(row.get("uTime") or row.get("cTime")),
            side=str(row.get("side", "")), pos_side=str(row.get("posSide", "")),
        )

    def get_order(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None:
        try:
            rows = self._retrying("get_order", self.trade.get_order, instId=inst_id, clOrdId=client_order_id)
        except ExchangeRejected as exc:
            if exc.code in ORDER_NOT_FOUND:
                return None
            raise
        return self._parse_order(rows[0]) if rows else None

    def close_position(self, *, inst_id: str, pos_side: str, client_order_id: str = "") -> ExchangeOrder | None:
        self._guard_live()
        try:
            self._retrying(
                "close_position", self.trade.close_positions, instId=inst_id, mgnMode=self.td_mode, posSide=pos_side,
                autoCxl="true", clOrdId=client_order_id,
            )
        except ExchangeRejected as exc:
            if exc.code in NO_POSITION:
                return None
            raise
        if client_order_id:
            try:
                found = self._get_order_once(inst_id=inst_id, client_order_id=client_order_id)
            except ExchangeError:
                found = None
            if found:
                return found
        return ExchangeOrder(client_order_id=client_order_id, order_id="", inst_id=inst_id, state="live", size=ZERO, pos_side=pos_side)

    def cancel_order(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None:
        self._guard_live()
        try:
            self._retrying("cancel_order", self.trade.cancel_order, instId=inst_id, clOrdId=client_order_id)
        except ExchangeRejected as exc:
            if exc.code not in ("51400", "51401", "51402") | ORDER_NOT_FOUND:
                raise
        return self.get_order(inst_id=inst_id, client_order_id=client_order_id)

    def cancel_algo_orders(self, *, inst_id: str) -> int:
        self._guard_live()
        pending: list[dict[str, str]] = []
        for ord_type in ("oco", "conditional"):
            rows = self._retrying("algo_list", self.trade.order_algos_list, ordType=ord_type, instType="SWAP", instId=inst_id)
            pending += [{"algoId": str(r.get("algoId")), "instId": inst_id} for r in rows if r.get("algoId")]
        if pending:
            self._retrying("cancel_algos", self.trade.cancel_algo_order, orders_data=pending)
        return len(pending)

    # --- reads ----------------------------------------------------------------------
    def positions(self) -> list[Position]:
        rows = self._retrying("positions", self.account_api.get_positions, instType="SWAP")
        result = []
        for row in rows:
            size = num(row.get("pos"))
            if size == 0:
                continue
            pos_side = str(row.get("posSide", "net"))
            if pos_side == "net":
                pos_side = "long" if size > 0 else "short"
            closers = [a for a in row.get("closeOrderAlgo") or [] if isinstance(a, dict)]
            result.append(Position(
                inst_id=str(row.get("instId", "")), pos_side=pos_side, size=abs(size), avg_px=num(row.get("avgPx")),
                notional_usd=abs(num(row.get("notionalUsd"))), leverage=num(row.get("lever"), Decimal("1")),
                unrealized_pnl=num(row.get("upl")), margin=num(row.get("margin")) or num(row.get("imr")),
                liq_px=opt(row.get("liqPx")), mark_px=opt(row.get("markPx")),
                stop_loss=next((opt(a.get("slTriggerPx")) for a in closers if a.get("slTriggerPx")), None),
                take_profit=next((opt(a.get("tpTriggerPx")) for a in closers if a.get("tpTriggerPx")), None),
                pos_id=str(row.get("posId", "")), opened_at=ms_to_dt(row.get("cTime")),
            ))
        return result

    def account(self) -> AccountState:
        rows = self._retrying("balance", self.account_api.get_account_balance, ccy="USDT")
        if not rows:
            raise ExchangeTemporaryError("OKX balance answer had no data", code="bad_body")
        top = rows[0]
        usdt = next((d for d in top.get("details") or [] if isinstance(d, dict) and d.get("ccy") == "USDT"), None)
        if usdt is None:
            equity = num(top.get("totalEq"))
            return AccountState(equity=equity, available_balance=equity)
        return AccountState(
            equity=num(usdt.get("eq")), available_balance=num(usdt.get("availBal") or usdt.get("availEq")),
            margin_used=num(usdt.get("frozenBal")), unrealized_pnl=num(usdt.get("upl")), cash=opt(usdt.get("cashBal")),
        )

    def _positions_history(self, *, since: datetime | None) -> list[dict[str, Any]]:
        """GET /api/v5/account/positions-history, every page back to `since` (or to the end of OKX's 3 months).

        OKX answers newest first (by uTime), at most `limit` (<= 100) rows a page plus any more rows sharing the
        last row's uTime; `after=<uTime ms>` asks for the rows strictly older. Paging stops at a short page, at
        rows older than `since`, at a page that does not move back in time (a cursor the server did not honour:
        never loop on it) or after HISTORY_MAX_PAGES pages (warned: the oldest closes are then missing).
        """
        since_ms = int(since.timestamp() * 1000) if since is not None else None
        rows: list[dict[str, Any]] = []
        after: int | None = None
        for page_no in range(1, HISTORY_MAX_PAGES + 1):
            params: dict[str, Any] = {"instType": "SWAP", "limit": str(HISTORY_PAGE_LIMIT)}
            if after is not None:
                params["after"] = str(after)
                self._sleep(HISTORY_PAGE_INTERVAL)  # OKX allows 10 positions-history requests per 2 s
            page = self._retrying("positions_history", self.account_api.get_positions_history, **params)
            timed = [(_ms(row.get("uTime")), row) for row in page]
            # Only rows older than the cursor are new; rows a server sends again (it ignored `after`) are dropped.
            fresh = [(t, row) for t, row in timed if after is None or (t is not None and t < after)]
            rows.extend(row for _, row in fresh)
            if len(page) < HISTORY_PAGE_LIMIT:
                return rows  # the last page
            oldest = min((t for t, _ in fresh if t is not None), default=None)
            if oldest is None:
                log.warning("okx_positions_history_not_advancing", page=page_no, after=after, rows=len(page))
                return rows
            if since_ms is not None and oldest < since_ms:
                return rows  # everything further back closed before `since`
            after = oldest
        log.warning("okx_positions_history_page_cap", pages=HISTORY_MAX_PAGES, rows=len(rows), oldest_utime=after,
                    since=since.isoformat() if since is not None else None)
        return rows

    def closed_positions(self, *, since: datetime | None = None) -> list[ClosedPosition]:
        rows = self._positions_history(since=since)
        result = []
        for row in rows:
            closed_at = ms_to_dt(row.get("uTime"))
            opened_at = ms_to_dt(row.get("cTime")) or closed_at
            if closed_at is None or opened_at is None or (since is not None and closed_at < since):
                continue
            kind = str(row.get("type", ""))
            result.append(ClosedPosition(
                inst_id=str(row.get("instId", "")), pos_side=str(row.get("posSide", "")), pos_id=str(row.get("posId", "")),
                opened_at=opened_at, closed_at=closed_at, open_avg_px=num(row.get("openAvgPx")),
                close_avg_px=num(row.get("closeAvgPx")), size=num(row.get("closeTotalPos")), pnl=num(row.get("pnl")),
                fee=-num(row.get("fee")), funding=num(row.get("fundingFee")), liq_penalty=-num(row.get("liqPenalty")),
                close_reason="liquidation" if kind in ("3", "4") else "", leverage=num(row.get("lever"), Decimal("1")),
            ))
        return sorted(result, key=lambda c: c.closed_at)

    def now(self) -> datetime:
        return datetime.now(dt_timezone.utc)
