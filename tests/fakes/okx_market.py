"""OKX public market endpoints on a FakeHttpServer: recorded sample bodies and a paging candle store.

`OkxMarketFake` registers routes under /api/v5 that answer exactly what OKX
sends (the real samples from ../shared/data/okx_api, or generated candle rows
in OKX's layout) and honour the candle cursors (`after`: older than,
`before`: newer than, `limit` capped at 300 for /market/candles and 100 for
/market/history-candles), newest first like OKX.

`real_market(shared_data, until=...)` serves OKX as it was at `until` from the
real recorded BTC-USDT-SWAP history in ../shared/data (15m/1H/4H candles,
funding rate history): /market/candles keeps only the newest 1440 bars like
OKX, older ones come from /market/history-candles, and the bar still forming
at `until` is sent unconfirmed.
"""
from __future__ import annotations

import csv
import gzip
import json
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.fakes.http_server import FakeHttpServer, Received, Reply

API = "/api/v5"
CANDLES = f"{API}/market/candles"
HISTORY_CANDLES = f"{API}/market/history-candles"
TICKER = f"{API}/market/ticker"
TICKERS = f"{API}/market/tickers"
BOOKS = f"{API}/market/books"
FUNDING_RATE = f"{API}/public/funding-rate"
OPEN_INTEREST = f"{API}/public/open-interest"
INSTRUMENTS = f"{API}/public/instruments"
TIME = f"{API}/public/time"
FUNDING_RATE_HISTORY = f"{API}/public/funding-rate-history"
BTC = "BTC-USDT-SWAP"
# What OKX's /market/candles still serves; older bars only on /market/history-candles.
RECENT_CANDLES = 1440
TF_MS = {"15m": 900_000, "1H": 3_600_000, "4H": 14_400_000}


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


def okx_rows_from_csv(path: Path, *, timeframe: str, until_ms: int, ct_val: Decimal = Decimal("0.01")) -> list[list[str]]:
    """Rows of a recorded `ts,open,high,low,close,volume` CSV as OKX sends them at `until_ms`, newest first.

    Bars closed by `until_ms` are confirmed; the one open at `until_ms` is sent
    with confirm "0". The prices and volCcy (index 6) are the recorded strings;
    vol (contracts) is volCcy / ctVal and volCcyQuote volCcy x close (OKX sends
    both; our parser reads only volCcy).
    """
    step = TF_MS[timeframe]
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[list[str]] = []
    with opener(path, "rt", newline="") as fh:  # type: ignore[operator]
        reader = csv.reader(fh)
        next(reader)
        for ts, o, h, low, c, v in reader:
            t = int(ts)
            if t >= until_ms:
                break
            volume = Decimal(v or "0")
            confirm = "1" if t + step <= until_ms else "0"
            rows.append([ts, o, h, low, c, str(volume / ct_val), v or "0", str(volume * Decimal(c)), confirm])
    return rows[::-1]


def funding_rows_from_csv(path: Path, *, inst_id: str, until_ms: int) -> list[dict[str, str]]:
    """Recorded `ts,funding_rate` settlements before `until_ms` as /public/funding-rate-history rows, newest first."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if int(row["ts"]) <= until_ms:
                rows.append({"instId": inst_id, "instType": "SWAP", "fundingRate": row["funding_rate"],
                             "fundingTime": row["ts"]})
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

    def real_market(self, shared_data: Path, *, until: datetime) -> dict[str, list[list[str]]]:
        """Serve OKX as it was at `until`: time, instruments, BTC candles (15m/1H/4H) and funding history.

        Returns the candle rows served per bar, newest first.
        """
        until_ms = int(until.timestamp() * 1000)
        samples = shared_data / "okx_api"
        self.reply(TIME, Reply(200, {"code": "0", "msg": "", "data": [{"ts": str(until_ms)}]}))
        self.sample(INSTRUMENTS, samples / "public_instruments_SWAP.nautilus_fixture.json")
        files = {"15m": "okx_BTC-USDT-SWAP_15m.csv.gz", "1H": "okx_BTC-USDT-SWAP_1H.csv", "4H": "okx_BTC-USDT-SWAP_4H.csv"}
        by_bar = {bar: okx_rows_from_csv(shared_data / f, timeframe=bar, until_ms=until_ms) for bar, f in files.items()}
        self.candles_by_bar(by_bar)
        funding = funding_rows_from_csv(shared_data / "okx_BTC-USDT-SWAP_funding_rate.csv", inst_id=BTC,
                                        until_ms=until_ms)
        self.server.route("GET", FUNDING_RATE_HISTORY, self._pager(funding, cap=400, key="fundingTime"))
        return by_bar

    def candles_by_bar(self, rows_by_bar: dict[str, list[list[str]]], *, recent: int = RECENT_CANDLES) -> None:
        """Candles per `bar` (newest first): the newest `recent` on /market/candles, all on /market/history-candles."""
        recent_pagers = {bar: self._pager(rows[:recent], cap=300) for bar, rows in rows_by_bar.items()}
        history_pagers = {bar: self._pager(rows, cap=100) for bar, rows in rows_by_bar.items()}

        def route(pagers: dict[str, Any]):  # noqa: ANN202 - a route handler
            def handle(req: Received) -> Reply:
                pager = pagers.get(req.query.get("bar", ""))
                if pager is None:
                    return Reply(200, {"code": "51000", "msg": f"Parameter bar error: {req.query.get('bar')}", "data": []})
                return pager(req)

            return handle

        self.server.route("GET", CANDLES, route(recent_pagers))
        self.server.route("GET", HISTORY_CANDLES, route(history_pagers))

    @staticmethod
    def _pager(rows: list[Any], *, cap: int, key: str | int = 0):  # noqa: ANN205 - a route handler
        def handle(req: Received) -> Reply:
            after = int(req.query["after"]) if req.query.get("after") else None
            before = int(req.query["before"]) if req.query.get("before") else None
            limit = min(int(req.query.get("limit") or 100), cap)
            selected = [r for r in rows if (after is None or int(r[key]) < after)
                        and (before is None or int(r[key]) > before)]
            return Reply(200, {"code": "0", "msg": "", "data": selected[:limit]})

        return handle

    def tickers(self, sample_row: dict[str, str], figures: dict[str, tuple[str, str]]) -> None:
        """Serve /market/tickers?instType=SWAP: `sample_row` (a real ticker row) re-addressed to each instrument of
        `figures` (inst_id -> (last, volCcy24h)), in OKX's row order (as given); another instType gets no rows."""
        rows = [{**sample_row, "instType": "SWAP", "instId": inst_id, "last": last, "volCcy24h": vol_ccy}
                for inst_id, (last, vol_ccy) in figures.items()]

        def handle(req: Received) -> Reply:
            if not req.query.get("instType"):
                return Reply(200, {"code": "50014", "msg": "Parameter instType can not be empty.", "data": []})
            return Reply(200, {"code": "0", "msg": "", "data": rows if req.query["instType"] == "SWAP" else []})

        self.server.route("GET", TICKERS, handle)

    def calls(self, path: str) -> list[Received]:
        return self.server.calls("GET", path)
