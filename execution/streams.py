"""What OKX's private streams push (orders, positions, account on /private; orders-algo on /business).

The exchange's own numbers are reconciled by one service, `execution.sync.account_sync`;
the stream's job is to make it run at once instead of at the next 15-second beat:
- `orders`: a fill (fillSz > 0, or state filled / partially_filled) or an order ending
  (canceled) requests a sync;
- `positions`: a change of any position's size or side since the last push requests one (the
  first push after a connect is the current state: the connect's own sync covers it);
- `orders-algo`: a stop-loss / take-profit that triggered (state effective, order_failed, ...)
  requests one;
- `account`: kept as the latest balance push (status only: the sync reads the balance itself).
After every (re)connect and login a fresh sync is requested: what happened while the stream
was down is then seen. Requests are coalesced: at most one per `min_interval` seconds, and a
request inside the interval is sent when it ends (so the last push is always followed by a sync).
`request_sync(reason)` is given by the caller (it queues the account-sync task on the orders queue).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from market.streams.okx_ws import StreamDataError

log = structlog.get_logger(__name__)

PRIVATE_ARGS = [
    {"channel": "orders", "instType": "SWAP"},
    # updateInterval "0": positions are pushed on events only, not every few seconds as well.
    {"channel": "positions", "instType": "SWAP", "extraParams": '{"updateInterval": "0"}'},
    {"channel": "account", "ccy": "USDT"},
]
ALGO_ARGS = [{"channel": "orders-algo", "instType": "SWAP"}]
ORDER_SYNC_STATES = frozenset({"filled", "partially_filled", "canceled", "mmp_canceled"})
ALGO_SYNC_STATES = frozenset({"effective", "partially_effective", "order_failed", "partially_failed"})


class PrivateStreamHandler:
    def __init__(self, *, request_sync: Callable[[str], None], min_interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request_sync, self.min_interval, self.clock = request_sync, min_interval, clock
        self.positions: dict[tuple[str, str], tuple[str, str]] | None = None  # (instId, posSide) -> (pos, avgPx)
        self.account: dict[str, Any] | None = None
        self.requested = 0
        self._last_sent = -1e9
        self._pending: str | None = None
        self._timer: asyncio.TimerHandle | None = None

    def on_connected(self, *, stream: str, reconnect: bool) -> None:
        if stream == "private":
            self.positions = None  # the first push after a connect is the state, not a change
        elif not reconnect:
            return  # the algo connection's first connect follows the private one's login: its sync covers both
        self.sync(f"{stream} stream {'reconnected' if reconnect else 'connected'}")

    def on_push(self, channel: str, arg: dict[str, Any], data: list[Any], message: dict[str, Any]) -> None:
        rows = [row for row in data if isinstance(row, dict)]
        if len(rows) != len(data):
            raise StreamDataError(f"{channel}: a 'data' row is not an object")
        if channel == "orders":
            for row in rows:
                fill = str(row.get("fillSz") or "0")
                state = str(row.get("state", ""))
                if state in ORDER_SYNC_STATES or fill not in ("0", ""):
                    self.sync(f"order {row.get('clOrdId') or row.get('ordId', '?')} {row.get('instId', '')} {state}"
                              + (f" fill {fill} @ {row.get('fillPx', '')}" if fill not in ("0", "") else ""))
                    break
        elif channel == "positions":
            seen = {(str(r.get("instId", "")), str(r.get("posSide", ""))): (str(r.get("pos", "")), str(r.get("avgPx", "")))
                    for r in rows}
            before = self.positions
            # A paged snapshot (curPage/lastPage) may come in parts: merge, then compare what changed.
            current = dict(before or {})
            if message.get("eventType") == "snapshot" and message.get("curPage") in (None, 1):
                current = {}
            current.update(seen)
            current = {k: v for k, v in current.items() if v[0] not in ("", "0")}
            self.positions = current
            if before is not None and current != before:
                changed = sorted(set(current.items()) ^ set(before.items()))
                self.sync(f"positions changed: {', '.join(f'{k[0]} {k[1]}' for k, _ in changed[:5])}")
        elif channel == "orders-algo":
            for row in rows:
                if str(row.get("state", "")) in ALGO_SYNC_STATES:
                    self.sync(f"algo order {row.get('algoId', '?')} {row.get('instId', '')} {row.get('state')}")
                    break
        elif channel == "account":
            self.account = rows[0] if rows else None
        else:
            raise StreamDataError(f"unknown private channel {channel[:40]!r}")

    def sync(self, reason: str) -> None:
        """Request an account sync now, or at the end of the coalescing interval."""
        now = self.clock()
        wait = self._last_sent + self.min_interval - now
        if wait <= 0 and self._timer is None:
            self._send(reason)
            return
        self._pending = reason if self._pending is None else self._pending
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a direct call): send now
                self._send(reason)
                return
            self._timer = loop.call_later(max(wait, 0.0), self._flush)

    def _flush(self) -> None:
        self._timer = None
        reason, self._pending = self._pending, None
        if reason is not None:
            self._send(reason)

    def _send(self, reason: str) -> None:
        self._last_sent = self.clock()
        self.requested += 1
        log.info("stream_account_sync_requested", reason=reason)
        self.request_sync(reason)
