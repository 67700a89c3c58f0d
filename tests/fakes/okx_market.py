"""OKX public market endpoints on a FakeHttpServer: recorded sample bodies and a paging candle store.

`OkxMarketFake` registers routes under /api/v5 that answer exactly what OKX
sends (the real samples from ../shared/data/okx_api, or generated candle rows
in OKX's layout) and honour the candle cursors (`after`: older than,
`before`: newer than, `limit` capped at 300 for /market/candles and 100 for
/market/history-candles), newest first like OKX.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.fakes.http_server import FakeHttpServer, Received, Reply

API = "/api/v5"
CANDLES = f"{API}/market/candles"
HISTORY_CANDLES = f"{API}/market/history-candles"
TICKER = f"{API}/market/ticker"
BOOKS = f"{API}/market/books"
FUNDING_RATE = f"{API}/public/funding-rate"
OPEN_INTEREST = f"{API}/public/open-interest"
INSTRUMENTS = f"{API}/public/instruments"
TIME = f"{API}/public/time"


def load_body(path: Path) -> Any:
    return json.loads(path.read_text())


def candle_rows(*, start_ms: int, count: int, step_ms: int, price: float = 60_000.0,
                forming: bool = True) -> list[list[str]]:
    """`count` OKX candle rows from `start_ms`, newest first; the newest is unconfirmed when `forming`."""
    rows = []
    for i in range(count):
        o = price + i
        c = o + (1 if i % 2 else -1)
        rows.append([str(start_ms + i * step_ms), str(o), str(max(o, c) + 5), str(min(o, c) - 5), str(c),
                     "123.45", f"{1.2345 + i:.4f}", "74000.1", "1"])
    if forming and rows:
        rows[-1][8] = "0"
    return rows[::-1]


class OkxMarketFake:
    def __init__(self, server: FakeHttpServer) -> None:
        self.server = server

    def reset(self) -> OkxMarketFake:
        """Forget routes and recorded requests, so one server can serve a whole test module."""
        with self.server._lock:
            self.server._routes.clear()
            self.server.requests.clear()
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def reply(self, path: str, *replies: Reply) -> None:
        self.server.route("GET", path, *replies)

    def sample(self, path: str, file: Path, status: int = 200) -> None:
        self.reply(path, Reply(status, file.read_bytes(), {"Content-Type": "application/json"}))

    def candle_store(self, rows_newest_first: list[list[str]], *, history_rows: list[list[str]] | None = None) -> None:
        """Serve /market/candles from `rows` and /market/history-candles from `history_rows` (default: the same)."""
        self.server.route("GET", CANDLES, self._pager(rows_newest_first, cap=300))
        self.server.route("GET", HISTORY_CANDLES, self._pager(
            rows_newest_first if history_rows is None else history_rows, cap=100))

    @staticmethod
    def _pager(rows: list[list[str]], *, cap: int):  # noqa: ANN205 - a route handler
        def handle(req: Received) -> Reply:
            after = int(req.query["after"]) if req.query.get("after") else None
            before = int(req.query["before"]) if req.query.get("before") else None
            limit = min(int(req.query.get("limit") or 100), cap)
            selected = [r for r in rows if (after is None or int(r[0]) < after)
                        and (before is None or int(r[0]) > before)]
            return Reply(200, {"code": "0", "msg": "", "data": selected[:limit]})

        return handle

    def calls(self, path: str) -> list[Received]:
        return self.server.calls("GET", path)
