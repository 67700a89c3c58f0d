"""OKX public market data over python-okx (`MarketData.MarketAPI`, `PublicData.PublicAPI`).

python-okx 0.4.4 is a thin httpx.Client: it has no timeout of its own (we set
one), and it calls `response.json()` without looking at the status, so HTTP
errors arrive as JSON bodies and non-JSON bodies (a 502 HTML page) raise a
JSON error. We watch every response's status with an httpx event hook and turn
all of it into our own exceptions here, at the boundary:

- temporary (retry): HTTP 429 and 5xx, timeouts and connection errors, OKX
  codes 50001 (service unavailable), 50004 (endpoint timeout), 50011 (rate
  limit), 50013 (system busy), 50026 (system error);
- permanent: HTTP 401/403, 50111-50113-type auth codes, 51xxx parameter codes
  and every other non-zero code;
- data: a body that is not JSON (unless 5xx) or a field that is not a number.

OKX sends numbers as strings and sometimes as "" (the funding rate's next
rate, for one): "" or a missing field is None, anything else unparsable is a
`FeedDataError` that names the field.
"""
from __future__ import annotations

import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import httpx
from django.conf import settings
from okx import MarketData, PublicData

from market.feeds.base import (
    Bar,
    BookLevel,
    FeedDataError,
    FeedError,
    FeedPermanentError,
    FeedTemporaryError,
    FundingRate,
    InstrumentSpec,
    OpenInterest,
    OrderBook,
    Ticker,
)
import structlog
from redaction import redact

log = structlog.get_logger(__name__)
T = TypeVar("T")

# OKX bar names for our timeframe names (they are the same strings today, but
# keep the mapping explicit so a new timeframe fails loudly).
OKX_BARS = {"1m": "1m", "5m": "5m", "15m": "15m", "1H": "1H", "4H": "4H", "1D": "1Dutc"}
TEMPORARY_CODES = frozenset({"50001", "50004", "50011", "50013", "50026"})
CANDLES_PAGE = 300  # /market/candles maximum per request
HISTORY_PAGE = 100  # /market/history-candles maximum per request
FUNDING_HISTORY_PAGE = 100  # /public/funding-rate-history allows 400; 100 is plenty per request
# Public rate limits (per IP): requests per window in seconds.
RATE_LIMITS: dict[str, tuple[int, float]] = {
    "candles": (40, 2.0),
    "history-candles": (20, 2.0),
    "default": (20, 2.0),
}


# --- number parsing ----------------------------------------------------------
def parse_decimal(row: dict[str, Any] | list[Any], key: str | int, *, required: bool = False,
                  name: str | None = None) -> Decimal | None:
    """A number OKX sent as a string: "" or missing -> None; garbage -> FeedDataError naming the field."""
    key_name = name or key
    try:
        raw = row[key]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raw = None
    if raw is None or raw == "":
        if required:
            raise FeedDataError(f"OKX field {key_name!r} is missing or empty")
        return None
    try:
        value = Decimal(str(raw))
    except (InvalidOperation, ValueError) as e:
        raise FeedDataError(f"OKX field {key_name!r} is not a number: {str(raw)[:40]!r}") from e
    if not value.is_finite():
        raise FeedDataError(f"OKX field {key_name!r} is not a finite number: {str(raw)[:40]!r}")
    return value


def parse_ms(row: dict[str, Any] | list[Any], key: str | int, *, required: bool = False,
             name: str | None = None) -> datetime | None:
    """An epoch-milliseconds string -> aware UTC datetime ("" -> None)."""
    value = parse_decimal(row, key, required=required, name=name)
    if value is None:
        return None
    try:
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError) as e:
        raise FeedDataError(f"OKX field {key!r} is not a timestamp: {value}") from e


def _required(value: T | None, what: str) -> T:
    if value is None:
        raise FeedDataError(f"OKX field {what!r} is missing or empty")
    return value


def to_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        raise ValueError("datetimes must be timezone-aware (UTC)")
    return int(dt.timestamp() * 1000)


def parse_candle_row(row: Any) -> Bar:
    """`[ts, o, h, l, c, vol, volCcy, volCcyQuote, confirm]` -> Bar (volume = volCcy, base currency).

    Only confirm == "1" is a closed bar; anything else stays flagged unconfirmed.
    """
    if not isinstance(row, list) or len(row) < 7:
        raise FeedDataError(f"OKX candle row has the wrong shape: {str(row)[:80]}")
    confirm = row[8] if len(row) > 8 else "0"
    return Bar(
        ts=parse_ms(row, 0, required=True, name="candle ts"),  # type: ignore[arg-type]
        open=parse_decimal(row, 1, required=True, name="candle open"),  # type: ignore[arg-type]
        high=parse_decimal(row, 2, required=True, name="candle high"),  # type: ignore[arg-type]
        low=parse_decimal(row, 3, required=True, name="candle low"),  # type: ignore[arg-type]
        close=parse_decimal(row, 4, required=True, name="candle close"),  # type: ignore[arg-type]
        volume=parse_decimal(row, 6, required=True, name="candle volCcy"),  # type: ignore[arg-type]
        confirmed=str(confirm) == "1",
    )


# --- rate limit and retries -------------------------------------------------
class RateLimiter:
    """A sliding-window limiter: at most `calls` acquisitions per `period` seconds (thread-safe)."""

    def __init__(self, calls: int, period: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.calls = calls
        self.period = period
        self._clock = clock
        self._sleep = sleep
        self._stamps: deque[float] = deque()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Wait until a call is allowed; return how long we waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                while self._stamps and now - self._stamps[0] >= self.period:
                    self._stamps.popleft()
                if len(self._stamps) < self.calls:
                    self._stamps.append(now)
                    return waited
                delay = self.period - (now - self._stamps[0])
            self._sleep(delay)
            waited += delay


def call_with_retries(
    fn: Callable[[], T],
    *,
    attempts: int | None = None,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "OKX request",
) -> T:
    """Call `fn`, retrying FeedTemporaryError with exponential backoff and jitter.

    Permanent errors pass straight through; the last temporary error is
    re-raised when the attempts run out. `attempts` defaults to
    OKX_MAX_RETRIES + 1.
    """
    total = attempts if attempts is not None else settings.OKX_MAX_RETRIES + 1
    for attempt in range(1, max(total, 1) + 1):
        try:
            return fn()
        except FeedTemporaryError as e:
            if attempt >= total:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("feed.retry", what=what, attempt=attempt, delay=round(delay, 2), error=str(e))
            sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


# --- the feed ----------------------------------------------------------------
class OkxFeed:
    """Live public market data from OKX (no API key needed).

    `flag` "1" sends `x-simulated-trading: 1` (demo trading's market), "0" the
    live market. `candles(before=...)` returns bars whose open time is
    strictly before `before` (OKX's `after` cursor), oldest first; the newest
    bar may be unconfirmed (`confirmed=False`): never treat it as closed.
    """

    name = "okx"

    def __init__(self, *, base_url: str | None = None, flag: str = "1", timeout: float = 10.0,
                 rate_limits: dict[str, tuple[int, float]] | None = None) -> None:
        self.base_url = (base_url or settings.OKX_BASE_URL).rstrip("/")
        self.flag = flag
        self.timeout = timeout
        self._local = threading.local()
        self._market = MarketData.MarketAPI(flag=flag, domain=self.base_url, debug=False)
        self._public = PublicData.PublicAPI(flag=flag, domain=self.base_url, debug=False)
        for client in (self._market, self._public):
            client.timeout = httpx.Timeout(timeout)
            client.event_hooks = {"request": [], "response": [self._remember_status]}
        limits = {**RATE_LIMITS, **(rate_limits or {})}
        self._limiters = {name: RateLimiter(calls, period) for name, (calls, period) in limits.items()}

    def close(self) -> None:
        self._market.close()
        self._public.close()

    def now(self) -> datetime:
        return datetime.now(UTC)

    # -- transport --------------------------------------------------------
    def _remember_status(self, response: httpx.Response) -> None:
        # python-okx discards the response; keep its status for error mapping.
        self._local.status = response.status_code

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, limiter: str = "default",
              **kwargs: Any) -> list[Any]:
        """Run one python-okx call and return the payload's `data` list, or raise a FeedError."""
        self._limiters[limiter].acquire()
        self._local.status = None
        try:
            payload = fn(*args, **kwargs)
        except httpx.TimeoutException as e:
            raise FeedTemporaryError(f"OKX {what}: timed out after {self.timeout}s") from e
        except httpx.TransportError as e:
            raise FeedTemporaryError(f"OKX {what}: connection failed: {redact(str(e))}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            status = self._local.status
            if status is not None and (status >= 500 or status == 429):
                raise FeedTemporaryError(f"OKX {what}: HTTP {status} with a non-JSON body",
                                         http_status=status) from e
            raise FeedDataError(f"OKX {what}: HTTP {status} with a non-JSON body", http_status=status) from e
        return self._check(what, payload, self._local.status)

    @staticmethod
    def _check(what: str, payload: Any, status: int | None) -> list[Any]:
        if not isinstance(payload, dict):
            raise FeedDataError(f"OKX {what}: expected a JSON object, got {type(payload).__name__}", http_status=status)
        code = str(payload.get("code", ""))
        msg = redact(str(payload.get("msg") or payload.get("error_message") or ""))[:200]
        detail = f"OKX {what}: HTTP {status} code {code} {msg}".strip()
        if status is not None and (status == 429 or status >= 500):
            raise FeedTemporaryError(detail, code=code, http_status=status)
        if status in (401, 403):
            raise FeedPermanentError(detail, code=code, http_status=status)
        if code in TEMPORARY_CODES:
            raise FeedTemporaryError(detail, code=code, http_status=status)
        if code != "0" or (status is not None and status >= 400):
            raise FeedPermanentError(detail, code=code, http_status=status)
        data = payload.get("data")
        if not isinstance(data, list):
            raise FeedDataError(f"OKX {what}: 'data' is not a list", http_status=status)
        return data

    def _one(self, what: str, data: list[Any]) -> dict[str, Any]:
        if not data or not isinstance(data[0], dict):
            raise FeedDataError(f"OKX {what}: empty or malformed 'data'")
        return data[0]

    # -- candles ----------------------------------------------------------
    def candle_page(self, inst_id: str, timeframe: str, *, after_ms: int | None = None,
                    before_ms: int | None = None, limit: int = CANDLES_PAGE, history: bool = False) -> list[Bar]:
        """One request, newest first as OKX sends it. `after_ms`: bars older than it; `before_ms`: newer."""
        bar = OKX_BARS.get(timeframe)
        if bar is None:
            raise FeedPermanentError(f"unknown timeframe {timeframe!r}; expected one of {', '.join(OKX_BARS)}")
        fn = self._market.get_history_candlesticks if history else self._market.get_candlesticks
        cap = HISTORY_PAGE if history else CANDLES_PAGE
        rows = self._call(
            "history-candles" if history else "candles", fn, inst_id,
            after="" if after_ms is None else str(after_ms), before="" if before_ms is None else str(before_ms),
            bar=bar, limit=str(max(1, min(limit, cap))), limiter="history-candles" if history else "candles",
        )
        return [parse_candle_row(row) for row in rows]

    def candles(self, inst_id: str, timeframe: str, *, limit: int = 300, before: datetime | None = None) -> list[Bar]:
        """The newest `limit` bars opening before `before` (default: up to now), oldest first.

        Pages backwards with the `after` cursor over /market/candles; when that
        endpoint runs out (it only keeps recent bars) it continues on
        /market/history-candles.
        """
        return self._paged(inst_id, timeframe, limit=limit, before=before, history=False)

    def history_candles(self, inst_id: str, timeframe: str, *, limit: int = 100,
                        before: datetime | None = None) -> list[Bar]:
        """Like `candles`, over /market/history-candles only (older data, 100 per page)."""
        return self._paged(inst_id, timeframe, limit=limit, before=before, history=True)

    def _paged(self, inst_id: str, timeframe: str, *, limit: int, before: datetime | None, history: bool) -> list[Bar]:
        found: dict[datetime, Bar] = {}
        cursor = to_ms(before) if before is not None else None
        while len(found) < limit:
            page = self.candle_page(inst_id, timeframe, after_ms=cursor, limit=limit - len(found), history=history)
            if cursor is not None:
                page = [b for b in page if to_ms(b.ts) < cursor]  # guard against a venue ignoring the cursor
            if not page:
                if history:
                    break
                history = True  # /market/candles has no older bars: continue on the history endpoint
                continue
            for bar in page:
                # Two rows for one open time: the confirmed (closed) one wins.
                if bar.ts not in found or (bar.confirmed and not found[bar.ts].confirmed):
                    found[bar.ts] = bar
            cursor = min(to_ms(b.ts) for b in page)
        return sorted(found.values(), key=lambda b: b.ts)[-limit:] if limit > 0 else []

    # -- the rest -----------------------------------------------------------
    def ticker(self, inst_id: str) -> Ticker:
        row = self._one("ticker", self._call("ticker", self._market.get_ticker, inst_id))
        return ticker_from_okx(row, inst_id)

    def tickers(self, inst_type: str = "SWAP") -> list[Ticker]:
        """Every instrument's ticker of `inst_type` (/market/tickers, one call); a row that does not parse is
        skipped with a warning, like an odd instrument row."""
        rows = self._call("tickers", self._market.get_tickers, inst_type)
        found: list[Ticker] = []
        for row in rows:
            if not isinstance(row, dict):
                raise FeedDataError("OKX tickers: a row is not an object")
            try:
                found.append(ticker_from_okx(row, ""))
            except FeedDataError as e:
                log.warning("okx.ticker_skipped", inst_id=row.get("instId"), error=str(e))
        return found

    def order_book(self, inst_id: str, depth: int = 5) -> OrderBook:
        row = self._one("books", self._call("books", self._market.get_orderbook, inst_id, sz=str(depth)))

        def levels(side: str) -> tuple[BookLevel, ...]:
            raw = row.get(side) or []
            if not isinstance(raw, list):
                raise FeedDataError(f"OKX books: {side!r} is not a list")
            return tuple(
                BookLevel(price=_required(parse_decimal(lvl, 0, name=f"{side} price"), f"{side} price"),
                          size=_required(parse_decimal(lvl, 1, name=f"{side} size"), f"{side} size"))
                for lvl in raw[:depth]
            )

        return OrderBook(inst_id=inst_id, ts=_required(parse_ms(row, "ts"), "ts"),
                         bids=levels("bids"), asks=levels("asks"))

    def funding_rate(self, inst_id: str) -> FundingRate:
        row = self._one("funding-rate", self._call("funding-rate", self._public.get_funding_rate, inst_id))
        return FundingRate(
            inst_id=str(row.get("instId") or inst_id),
            ts=parse_ms(row, "ts") or self.now(),
            rate=parse_decimal(row, "fundingRate"),
            next_funding_time=parse_ms(row, "nextFundingTime") or parse_ms(row, "fundingTime"),
            next_rate=parse_decimal(row, "nextFundingRate"),
        )

    def funding_rate_history(self, inst_id: str, *, limit: int = 100,
                             before: datetime | None = None) -> list[FundingRate]:
        """Settled funding rates (newest `limit` settling before `before`), oldest first.

        /public/funding-rate-history pages with `after` (settlements earlier
        than the cursor), newest first; OKX keeps about three months of it.
        The rate is `realizedRate` (what was actually charged) when OKX sends
        it, else `fundingRate`.
        """
        found: dict[datetime, FundingRate] = {}
        cursor = to_ms(before) if before is not None else None
        while len(found) < limit:
            rows = self._call("funding-rate-history", self._public.funding_rate_history, inst_id,
                              after="" if cursor is None else str(cursor),
                              limit=str(max(1, min(limit - len(found), FUNDING_HISTORY_PAGE))))
            page = []
            for row in rows:
                if not isinstance(row, dict):
                    raise FeedDataError("OKX funding-rate-history: a row is not an object")
                ts = _required(parse_ms(row, "fundingTime"), "fundingTime")
                if cursor is None or to_ms(ts) < cursor:  # guard against a venue ignoring the cursor
                    rate = parse_decimal(row, "realizedRate")
                    rate = parse_decimal(row, "fundingRate") if rate is None else rate
                    page.append(FundingRate(inst_id=inst_id, ts=ts, rate=rate, next_funding_time=None))
            if not page:
                break
            for rate in page:
                found[rate.ts] = rate
            cursor = min(to_ms(r.ts) for r in page)
        return sorted(found.values(), key=lambda r: r.ts)[-limit:] if limit > 0 else []

    def open_interest(self, inst_id: str) -> OpenInterest:
        data = self._call("open-interest", self._public.get_open_interest, "SWAP", instId=inst_id)
        row = self._one("open-interest", data)
        return OpenInterest(
            inst_id=str(row.get("instId") or inst_id),
            ts=parse_ms(row, "ts") or self.now(),
            oi_contracts=parse_decimal(row, "oi"),
            oi_ccy=parse_decimal(row, "oiCcy"),
            oi_usd=parse_decimal(row, "oiUsd"),
        )

    def instruments(self, inst_type: str = "SWAP") -> list[InstrumentSpec]:
        """Every instrument of `inst_type`; rows missing a size field are skipped with a warning."""
        rows = self._call("instruments", self._public.get_instruments, inst_type)
        specs: list[InstrumentSpec] = []
        for row in rows:
            if not isinstance(row, dict):
                raise FeedDataError("OKX instruments: a row is not an object")
            try:
                specs.append(instrument_spec_from_okx(row))
            except FeedDataError as e:
                # One odd row (a pre-listing instrument with empty sizes) must not hide the rest.
                log.warning("okx.instrument_skipped", inst_id=row.get("instId"), error=str(e))
        return specs

    def system_time(self) -> datetime:
        """OKX server time; a cheap reachability probe."""
        row = self._one("time", self._call("time", self._public.get_system_time))
        return _required(parse_ms(row, "ts"), "ts")


def ticker_from_okx(row: dict[str, Any], inst_id: str) -> Ticker:
    return Ticker(
        inst_id=_required(str(row.get("instId") or inst_id) or None, "instId"),
        ts=_required(parse_ms(row, "ts"), "ts"),
        last=_required(parse_decimal(row, "last"), "last"),
        bid=parse_decimal(row, "bidPx"),
        ask=parse_decimal(row, "askPx"),
        open_24h=parse_decimal(row, "open24h"),
        high_24h=parse_decimal(row, "high24h"),
        low_24h=parse_decimal(row, "low24h"),
        # For SWAP, vol24h is in contracts and volCcy24h in base currency.
        volume_24h=parse_decimal(row, "volCcy24h"),
    )


def instrument_spec_from_okx(row: dict[str, Any]) -> InstrumentSpec:
    return InstrumentSpec(
        inst_id=_required(row.get("instId") or None, "instId"),
        inst_type=str(row.get("instType") or "SWAP"),
        ct_val=_required(parse_decimal(row, "ctVal"), "ctVal"),
        lot_sz=_required(parse_decimal(row, "lotSz"), "lotSz"),
        min_sz=_required(parse_decimal(row, "minSz"), "minSz"),
        tick_sz=_required(parse_decimal(row, "tickSz"), "tickSz"),
        max_lever=parse_decimal(row, "lever") or Decimal("1"),
        settle_ccy=str(row.get("settleCcy") or ""),
        state=str(row.get("state") or "live"),
    )


__all__ = [
    "OkxFeed",
    "RateLimiter",
    "call_with_retries",
    "parse_candle_row",
    "parse_decimal",
    "parse_ms",
    "instrument_spec_from_okx",
    "FeedError",
]
