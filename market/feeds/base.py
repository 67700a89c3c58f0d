"""The one interface every market feed implements, and the values it returns.

Feeds: `OkxFeed` (python-okx, live public data), `ReplayFeed` (CSV or database
candles on a virtual clock) and `SyntheticFeed` (the seeded synthetic market).
Values are frozen dataclasses with Decimal prices and aware UTC datetimes;
fields a venue may leave empty are Optional and `None` when missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Protocol, runtime_checkable


class FeedError(Exception):
    """A market feed could not answer. `retryable` says whether trying again may help."""

    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class FeedTemporaryError(FeedError):
    """Timeouts, HTTP 429 and 5xx, OKX 50001/50004/50011/50013-type codes: try again later."""

    retryable = True


class FeedPermanentError(FeedError):
    """Authentication, bad parameters, unknown instrument: trying again will not help."""


class FeedDataError(FeedPermanentError):
    """The venue answered with a payload we cannot parse (missing or malformed fields)."""


@dataclass(frozen=True, slots=True)
class Bar:
    ts: datetime  # open time, aware UTC
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal  # base currency
    confirmed: bool = True


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    inst_id: str
    inst_type: str
    ct_val: Decimal
    lot_sz: Decimal
    min_sz: Decimal
    tick_sz: Decimal
    max_lever: Decimal
    settle_ccy: str
    state: str


@dataclass(frozen=True, slots=True)
class Ticker:
    inst_id: str
    ts: datetime
    last: Decimal
    bid: Decimal | None
    ask: Decimal | None
    open_24h: Decimal | None
    high_24h: Decimal | None
    low_24h: Decimal | None
    volume_24h: Decimal | None  # base currency
    mark: Decimal | None = None


@dataclass(frozen=True, slots=True)
class BookLevel:
    price: Decimal
    size: Decimal


@dataclass(frozen=True, slots=True)
class OrderBook:
    inst_id: str
    ts: datetime
    bids: tuple[BookLevel, ...] = field(default_factory=tuple)  # best first
    asks: tuple[BookLevel, ...] = field(default_factory=tuple)  # best first


@dataclass(frozen=True, slots=True)
class FundingRate:
    inst_id: str
    ts: datetime
    rate: Decimal | None  # OKX may send "" here: None
    next_funding_time: datetime | None
    next_rate: Decimal | None = None


@dataclass(frozen=True, slots=True)
class OpenInterest:
    inst_id: str
    ts: datetime
    oi_contracts: Decimal | None
    oi_ccy: Decimal | None
    oi_usd: Decimal | None = None


@runtime_checkable
class MarketFeed(Protocol):
    """What the bot needs from a market data source.

    `candles` returns bars oldest first. `now()` is the feed's clock: wall time
    for live feeds, the virtual clock for replay; a feed never returns a bar
    that closes after its clock.
    """

    name: str

    def now(self) -> datetime: ...

    def instruments(self, inst_type: str = "SWAP") -> list[InstrumentSpec]: ...

    def candles(self, inst_id: str, timeframe: str, *, limit: int = 300, before: datetime | None = None) -> list[Bar]: ...

    def ticker(self, inst_id: str) -> Ticker: ...

    def order_book(self, inst_id: str, depth: int = 5) -> OrderBook: ...

    def funding_rate(self, inst_id: str) -> FundingRate: ...

    def open_interest(self, inst_id: str) -> OpenInterest: ...
