"""The one exchange interface, its value types and its exception tree.

Two implementations: `OkxExchange` (python-okx, demo by default) and
`PaperExchange` (the local simulator). Services never know which one they
talk to. An order can only be placed from an `ApprovedOrder`, which only the
risk gate can build (`execution.risk`); `Exchange.place_order` checks that
before it hands the order to the implementation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from execution.risk import ApprovedOrder, approval_is_genuine

ZERO = Decimal("0")


# --- Exceptions -------------------------------------------------------------
class ExchangeError(Exception):
    """Base of everything an exchange adapter raises."""

    retryable: bool = False

    def __init__(self, message: str, *, code: str = "", http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status


class ExchangeTemporaryError(ExchangeError):
    """Timeouts, HTTP 429/5xx, OKX 50001/50004/50011/50013-type codes: try again later."""

    retryable = True


class ExchangeUnreachable(ExchangeTemporaryError):
    """No connection to the exchange at all (refused, no route, DNS, connect timeout): the request never left.

    Not retried inside a stage: retries only held the instrument's next ticks back (#16). The stage fails fast, the
    cycle ends FAILED "exchange unreachable", and the positions stay protected by their exchange-side stops.
    """

    retryable = False


class ExchangeRejected(ExchangeError):
    """The exchange refused the request (51008 insufficient margin, other 51xxx, bad params): do not retry."""


class ExchangeUnknownOutcome(ExchangeError):
    """A placement may or may not have happened; look the order up by client order id before anything else."""

    retryable = True


class LiveTradingRefused(ExchangeError):
    """Real money was asked for without the setting and a person's confirmation."""


class UnapprovedOrder(ExchangeError):
    """Something other than the risk gate's `ApprovedOrder` reached an exchange."""


# --- Value types ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Position:
    inst_id: str
    pos_side: str  # "long" / "short"
    size: Decimal = ZERO  # contracts
    avg_px: Decimal = ZERO
    notional_usd: Decimal = ZERO
    leverage: Decimal = Decimal("1")
    unrealized_pnl: Decimal = ZERO
    margin: Decimal = ZERO
    liq_px: Decimal | None = None
    mark_px: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    pos_id: str = ""
    opened_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AccountState:
    """Equity and balances; day-start and peak equity come from the bot's state."""

    equity: Decimal
    available_balance: Decimal
    margin_used: Decimal = ZERO
    unrealized_pnl: Decimal = ZERO
    cash: Decimal | None = None
    day_start_equity: Decimal | None = None
    peak_equity: Decimal | None = None

    def as_json(self) -> dict[str, str | None]:
        return {k: (None if v is None else str(v)) for k, v in (
            ("equity", self.equity), ("available_balance", self.available_balance), ("margin_used", self.margin_used),
            ("unrealized_pnl", self.unrealized_pnl), ("cash", self.cash),
            ("day_start_equity", self.day_start_equity), ("peak_equity", self.peak_equity))}


@dataclass(frozen=True, slots=True)
class ExchangeOrder:
    """An order as the exchange reports it (OKX `state` words)."""

    client_order_id: str
    order_id: str
    inst_id: str
    state: str  # live, partially_filled, filled, canceled, rejected
    size: Decimal
    filled_size: Decimal = ZERO
    avg_px: Decimal | None = None
    fee: Decimal = ZERO  # positive = cost
    ts: datetime | None = None
    side: str = ""
    pos_side: str = ""


@dataclass(frozen=True, slots=True)
class ClosedPosition:
    """A position that closed, with the exchange's own numbers (OKX positions-history)."""

    inst_id: str
    pos_side: str
    pos_id: str
    opened_at: datetime
    closed_at: datetime
    open_avg_px: Decimal
    close_avg_px: Decimal
    size: Decimal  # contracts closed
    pnl: Decimal  # price PnL
    fee: Decimal  # positive = cost
    funding: Decimal  # received (+) / paid (-)
    liq_penalty: Decimal = ZERO  # positive = cost
    close_reason: str = ""  # take_profit, stop_loss, liquidation, close ("" when the exchange does not say)
    leverage: Decimal = Decimal("1")
    margin: Decimal = ZERO

    @property
    def realized_pnl(self) -> Decimal:
        """Net: price PnL - fees + funding - liquidation penalty."""
        return self.pnl - self.fee + self.funding - self.liq_penalty


@dataclass(frozen=True, slots=True)
class Fill:
    client_order_id: str
    inst_id: str
    side: str
    size: Decimal
    price: Decimal
    fee: Decimal
    ts: datetime
    kind: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Exchange(ABC):
    """What execution needs from a venue. Sizes are contracts; prices and money are Decimal."""

    name: str = "exchange"

    def place_order(self, order: ApprovedOrder) -> ExchangeOrder:
        """Place an order the risk gate approved; anything else is refused here."""
        if not approval_is_genuine(order):
            raise UnapprovedOrder("only an ApprovedOrder built by the risk gate can be placed")
        return self._place_order(order)

    @abstractmethod
    def _place_order(self, order: ApprovedOrder) -> ExchangeOrder: ...

    @abstractmethod
    def set_leverage(self, *, inst_id: str, leverage: Decimal, pos_side: str) -> None: ...

    @abstractmethod
    def close_position(self, *, inst_id: str, pos_side: str, client_order_id: str = "") -> ExchangeOrder | None:
        """Close the whole position reduce-only at market; None when there was nothing to close."""

    @abstractmethod
    def cancel_order(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None: ...

    @abstractmethod
    def cancel_algo_orders(self, *, inst_id: str) -> int:
        """Cancel attached/standalone TP/SL orders of an instrument; returns how many."""

    @abstractmethod
    def get_order(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None:
        """The order with this client order id, or None when the exchange has none."""

    @abstractmethod
    def positions(self) -> list[Position]: ...

    @abstractmethod
    def account(self) -> AccountState: ...

    @abstractmethod
    def closed_positions(self, *, since: datetime | None = None) -> list[ClosedPosition]: ...

    @abstractmethod
    def now(self) -> datetime:
        """The exchange's clock: wall time for OKX, the bars' time for paper."""
