"""A local paper exchange faithful to OKX USDT-margined swaps, with its book in the database.

Model (documented, tested by hand-computed cases in tests/execution/test_paper_exchange.py):
- sizes are contracts of `ctVal` base units, rounded to `lotSz`, at least `minSz`; prices on `tickSz`;
- isolated margin: margin = entry notional / leverage, kept inside cash; equity = cash + unrealised PnL;
  available = cash - position margins - margin reserved by resting orders;
- market orders fill at the last price +/- `PAPER_SLIPPAGE` (buy up, sell down) with the taker fee;
  resting limit orders fill at their price when a bar (or price) crosses it, with the maker fee; a
  limit order that is marketable when placed fills at once as a taker (never worse than its price);
- attached SL/TP trigger on the bar's low/high; when one bar touches both, the stop fills first;
  a bar that opens beyond the stop (a gap) fills the stop at the bar's open, not at the stop;
  both fill with the taker fee;
- funding at 00:00, 08:00 and 16:00 UTC for positions open before that time, from the rate given by
  `set_funding_rate`: a long pays size*ctVal*price*rate (a short receives it), price = the price then;
- liquidation (isolated) when margin + unrealised PnL <= maintenance margin (mmr * notional at mark):
      long:  liq = (E*Q - M) / (Q * (1 - mmr))      short: liq = (E*Q + M) / (Q * (1 + mmr))
  with E entry, Q = contracts*ctVal, M margin, mmr = PAPER_MAINT_MARGIN_RATE. The position closes at
  the liquidation price and the remaining maintenance margin is the liquidation penalty, so the
  position loses exactly its margin (a bar that opens beyond it fills there too: margin lost);
- the clock is the time of the last bar/price given (`process_bar`/`set_price`), so replays work. It never
  moves backwards, and an account's first price fixes which clock it follows: "wall" (a live bot's real time)
  or "virtual" (a replay, the demo, fixed test times). A shared account then refuses a price from the other
  clock (`ClockMixed`): a wall account a time far from now, a virtual account a jump from its past to now. A
  real-time cycle that set the clock forward and virtual times used after it had left a filled order without
  its trade and a trade open after its position closed (#16).

`exclusive=True` (the replay: this instance is the ONLY writer of its account) keeps the book in
memory between its own writes: a bar that triggers nothing (no funding time, no SL/TP/liquidation
touched, no limit order crossed) only moves the in-memory price, written to PaperPrice before the
next operation that reads it (and on `flush()`); positions and balances are computed from the
in-memory copy of the rows. Its own writes (orders, closes, funding, SL/TP) work on that copy
without locking or reading the account (nothing else writes it) and the copy follows the rows
they saved; it is read again only after a write that failed, a resting limit order's fill and a
cancel. The funding rate and the clock are kept in memory the same way (PaperPrice is written on
`flush()`), and so is the set of the account's client order ids (the duplicate check). The rows
kept hold what a read would give (`execution.models.row_as_read`). The figures are the same as without it
(tests/tradebot/test_replay_runs.py runs one scenario through both and compares). Live workers share an account across
processes, so they never use it.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, FilteredRelation, OuterRef, Q
from django.utils import timezone

from execution.exchanges.base import (
    AccountState,
    ClosedPosition,
    Exchange,
    ExchangeOrder,
    ExchangeRejected,
    Position,
)
from execution.models import PaperAccount, PaperFill, PaperFunding, PaperOrder, PaperPosition, PaperPrice, row_as_read
from execution.validation import round_down_to_lot, round_to_tick
from market.models import Instrument
import structlog

log = structlog.get_logger(__name__)
Q10 = Decimal("1e-10")
ZERO = Decimal("0")
FUNDING_HOURS = (0, 8, 16)


def q(value: Decimal) -> Decimal:
    return value.quantize(Q10)


def next_funding_after(ts: datetime) -> datetime:
    """The first 00/08/16 UTC boundary strictly after `ts`."""
    ts = ts.astimezone(dt_timezone.utc)
    base = ts.replace(minute=0, second=0, microsecond=0, hour=(ts.hour // 8) * 8)
    return base + timedelta(hours=8)


@dataclass
class _Book:
    """The exclusive instance's copy of its account: cash, open positions, live orders."""

    cash: Decimal
    positions: list[PaperPosition]
    orders: list[PaperOrder]


class ClockMixed(ExchangeRejected):
    """A price from the other clock than the account's (wall vs virtual): refused, nothing written."""


def wall_tolerance_seconds() -> float:
    """How far from real time a live price may be and still be real time: a tick waits at most one interval
    (older ones are SKIPPED as late), a stage resumed after a lost worker runs up to its limit later; twice
    that, at least ten minutes."""
    stage = settings.CELERY_TASK_TIME_LIMIT + settings.CYCLE_STAGE_GRACE_SECONDS
    return float(max(600, 2 * settings.DECISION_CYCLE_SECONDS + stage))


class PaperExchange(Exchange):
    name = "paper"

    def __init__(
        self,
        *,
        account_name: str | None = None,  # default: settings.PAPER_ACCOUNT ("demo" for the demo's workers)
        start_balance: Decimal | None = None,
        slippage: Decimal | None = None,
        taker_fee: Decimal | None = None,
        maker_fee: Decimal | None = None,
        maint_margin_rate: Decimal | None = None,
        exclusive: bool = False,
        lazy: bool = False,
    ) -> None:
        self.slippage = settings.PAPER_SLIPPAGE if slippage is None else slippage
        self.taker_fee = settings.PAPER_TAKER_FEE if taker_fee is None else taker_fee
        self.maker_fee = settings.PAPER_MAKER_FEE if maker_fee is None else maker_fee
        self.mmr = settings.PAPER_MAINT_MARGIN_RATE if maint_margin_rate is None else maint_margin_rate
        self._account_name = account_name or settings.PAPER_ACCOUNT
        self._start_balance = settings.PAPER_START_BALANCE if start_balance is None else start_balance
        self._account_id: int | None = None
        if not lazy or exclusive:  # the account row exists once the exchange does (callers rely on it)
            self._account_id = self._account_resolve()
        self.exclusive = exclusive
        self.closes = 0  # positions this instance closed (SL/TP, liquidation, close orders): tells a replay to sync
        self._specs: dict[str, Instrument] = {}
        self._book: _Book | None = None
        self._prices: dict[str, tuple[Decimal, datetime]] = {}  # exclusive: the last price and clock per instrument
        self._dirty: set[str] = set()  # prices not written to PaperPrice yet
        self._funding: dict[str, Decimal | None] = {}  # exclusive: the funding rate per instrument (PaperPrice's)
        self._funding_dirty: set[str] = set()  # funding rates not written to PaperPrice yet
        self._client_ids: set[str] | None = None  # exclusive: every client order id of the account (read once)
        self._clock_floor: datetime | None = None  # exclusive: the latest PaperPrice clock when first asked
        self._clock_read = False

    def _account_resolve(self) -> int:
        return PaperAccount.objects.get_or_create(name=self._account_name, defaults={"cash": q(self._start_balance)})[0].pk

    @property
    def account_id(self) -> int:
        """The account row's id. `lazy=True` (a worker's handle, made per task) looks it up on first
        use, so a task that never touches the book (research, journaling) reads nothing."""
        if self._account_id is None:
            self._account_id = self._account_resolve()
        return self._account_id

    # --- the exclusive instance's memory ----------------------------------------------
    def _book_get(self) -> _Book:
        if self._book is None:
            self._book = _Book(
                cash=PaperAccount.objects.values_list("cash", flat=True).get(pk=self.account_id),
                positions=list(PaperPosition.objects.filter(account_id=self.account_id, status="open")),
                orders=list(PaperOrder.objects.filter(account_id=self.account_id, state="live")),
            )
        return self._book

    def _changed(self) -> None:
        """The database book was written: the memory copy is reloaded on next use."""
        self._book = None

    def _memory_account(self, book: _Book) -> PaperAccount:
        """Exclusive: the account row as the book knows it, to write under without a lock (no other writer)."""
        return PaperAccount(pk=self.account_id, name=self._account_name, cash=book.cash)

    def _book_keep(self, book: _Book, account: PaperAccount, *, positions: Iterable[PaperPosition] = (),
                   orders: Iterable[PaperOrder] = ()) -> None:
        """Exclusive: after a write that succeeded, the book follows the rows it saved (the objects in
        hand, as written, with the values a read would give) instead of being read again: the
        account's cash, the positions still open (in the model's order, as a read gives them) and
        the orders still live. Whatever the write returns is built before (from the rows as they were)."""
        held = book.positions + [p for p in positions if all(p is not b for b in book.positions)]
        live = book.orders + [o for o in orders if all(o is not b for b in book.orders)]
        self._book = _Book(
            cash=row_as_read(account).cash,  # type: ignore[attr-defined]
            positions=sorted((row_as_read(p) for p in held if p.status == "open"), key=lambda p: (p.opened_at, p.pk)),
            orders=sorted((row_as_read(o) for o in live if o.state == "live"), key=lambda o: (o.created_at, o.pk)),
        )

    def _client_id_known(self, client_order_id: str) -> bool:
        """Exclusive: whether the account has an order with this client order id, from the set read once
        (every order this instance writes is added to it when its transaction part succeeds)."""
        if self._client_ids is None:
            self._client_ids = set(PaperOrder.objects.filter(account_id=self.account_id).values_list("client_order_id", flat=True))
        return client_order_id in self._client_ids

    def _client_id_add(self, client_order_id: str) -> None:
        if self._client_ids is not None:
            self._client_ids.add(client_order_id)

    def flush(self) -> None:
        """Write the in-memory prices and funding rates to PaperPrice (exclusive mode; a no-op otherwise)."""
        for inst_id in self._dirty | self._funding_dirty:
            fields: dict[str, Any] = {}
            if inst_id in self._dirty:
                fields["last"], fields["ts"] = self._prices[inst_id]
            if inst_id in self._funding_dirty:
                fields["funding_rate"] = self._funding[inst_id]
            PaperPrice.objects.filter(account_id=self.account_id, inst_id=inst_id).update(**fields)
        self._dirty.clear()
        self._funding_dirty.clear()

    def exposed(self) -> bool:
        """An open position or a resting order: every bar matters."""
        if self.exclusive:
            book = self._book_get()
            return bool(book.positions or book.orders)
        return (PaperPosition.objects.filter(account_id=self.account_id, status="open").exists()
                or PaperOrder.objects.filter(account_id=self.account_id, state="live").exists())

    def _quiet_bar(self, inst_id: str, ts: datetime, high: Decimal, low: Decimal) -> bool:
        """Nothing in the book reacts to this bar: no funding time, no trigger touched, no limit crossed."""
        book = self._book_get()
        ct_val = None
        for pos in book.positions:
            if pos.inst_id != inst_id:
                continue
            if next_funding_after(pos.last_funding_at) <= ts:
                return False
            ct_val = ct_val if ct_val is not None else self._spec(inst_id).ct_val
            if any(self._trigger_hits(pos, ct_val, high, low)[1:]):
                return False
        return not any(o.inst_id == inst_id and o.ord_type == "limit" and self._crossed(o, high, low) for o in book.orders)

    # --- helpers ---------------------------------------------------------------
    def _spec(self, inst_id: str) -> Instrument:
        """The instrument's contract spec, read once per instance (live: one per task; replay: one per run)."""
        spec = self._specs.get(inst_id)
        if spec is not None:
            return spec
        spec = Instrument.objects.filter(inst_id=inst_id).first()
        if spec is None:
            raise ExchangeRejected(f"Instrument ID {inst_id} doesn't exist", code="51001")
        self._specs[inst_id] = spec
        return spec

    def _locked_account(self) -> PaperAccount:
        return PaperAccount.objects.select_for_update().get(pk=self.account_id)

    def _last(self, inst_id: str) -> PaperPrice:
        self.flush()
        row = PaperPrice.objects.filter(account_id=self.account_id, inst_id=inst_id).first()
        if row is None or row.last is None or row.ts is None:
            raise ExchangeRejected(f"no price known for {inst_id} yet: call set_price or process_bar first", code="51000")
        return row

    def _last_price(self, inst_id: str) -> tuple[Decimal, datetime]:
        """(last price, its time) for an order: from memory in exclusive mode (nothing else writes the
        book, so memory is the latest; `_last` would first write it out and read it back), else `_last`."""
        known = self._prices.get(inst_id) if self.exclusive else None
        if known is not None:
            return known
        row = self._last(inst_id)
        return row.last, row.ts  # type: ignore[return-value]

    def now(self) -> datetime:
        if self.exclusive:
            return self._memory_now()
        return self._stored_now()

    def _stored_now(self) -> datetime:
        return self._latest_stored_clock() or timezone.now()

    def _latest_stored_clock(self) -> datetime | None:
        """The latest clock of the account's prices in PaperPrice (memory written out first), None if none."""
        self.flush()
        return PaperPrice.objects.filter(account_id=self.account_id, ts__isnull=False).order_by("-ts").values_list("ts", flat=True).first()

    def _memory_now(self) -> datetime:
        """Exclusive: `now()` without a read after the first. Only this instance writes the account's
        clocks, each only forward and each kept in `_prices`, so the latest clock stored is the later
        of the latest when first read and the latest in memory (UTC, as a read gives it)."""
        if not self._clock_read:
            self._clock_floor = self._latest_stored_clock()
            self._clock_read = True
        clocks = [ts for _, ts in self._prices.values()]
        if self._clock_floor is not None:
            clocks.append(self._clock_floor)
        return max(clocks).astimezone(dt_timezone.utc) if clocks else timezone.now()

    def liquidation_price(self, pos: PaperPosition, ct_val: Decimal) -> Decimal:
        qty = pos.size * ct_val
        if qty <= 0:
            return ZERO
        if pos.pos_side == "long":
            return max(ZERO, (pos.avg_px * qty - pos.margin) / (qty * (1 - self.mmr)))
        return (pos.avg_px * qty + pos.margin) / (qty * (1 + self.mmr))

    @staticmethod
    def _upl(pos: PaperPosition, price: Decimal, ct_val: Decimal) -> Decimal:
        sign = 1 if pos.pos_side == "long" else -1
        return sign * (price - pos.avg_px) * pos.size * ct_val

    def _reserved(self) -> Decimal:
        """Margin held by resting orders (summed here, not in SQL: SQLite would add the decimals as floats)."""
        live = PaperOrder.objects.filter(account_id=self.account_id, state="live").values_list("reserved_margin", flat=True)
        return sum(live, ZERO)

    def _cash_and_reserved(self) -> tuple[Decimal, Decimal]:
        """The account's cash and the margin its resting orders hold, in one query (a row per live order)."""
        rows = PaperAccount.objects.filter(pk=self.account_id).annotate(
            live=FilteredRelation("orders", condition=Q(orders__state="live"))).values_list("cash", "live__reserved_margin")
        rows = list(rows)
        if not rows:
            raise PaperAccount.DoesNotExist(f"paper account {self.account_id} does not exist")
        return rows[0][0], sum((r for _, r in rows if r is not None), ZERO)

    def _available(self, account: PaperAccount) -> Decimal:
        margins = PaperPosition.objects.filter(account=account, status="open").values_list("margin", flat=True)
        return account.cash - sum(margins, ZERO) - self._reserved()

    @staticmethod
    def _as_exchange_order(o: PaperOrder) -> ExchangeOrder:
        return ExchangeOrder(
            client_order_id=o.client_order_id, order_id=str(o.pk), inst_id=o.inst_id, state=o.state, size=o.size,
            filled_size=o.filled_size, avg_px=o.avg_px, fee=o.fee, ts=o.updated_at, side=o.side, pos_side=o.pos_side,
        )

    # --- the interface ---------------------------------------------------------------
    def set_leverage(self, *, inst_id: str, leverage: Decimal, pos_side: str) -> None:
        spec = self._spec(inst_id)
        if leverage < 1 or leverage > spec.max_lever:
            raise ExchangeRejected(f"leverage {leverage} outside 1..{spec.max_lever} for {inst_id}", code="59102")

    def _place_order(self, order: Any) -> ExchangeOrder:
        try:
            return self._place_atomically(order)
        except ExchangeRejected as exc:
            self._changed()
            # The transaction rolled back; the rejected order is still a row (like OKX's order history).
            row = getattr(exc, "row", None)
            if row is not None:
                row.pk = None
                row.save()
                self._client_id_add(row.client_order_id)
            raise
        except BaseException:
            self._changed()  # rolled back: the memory copy (whose rows may have been changed) is read again
            raise

    def _reject(self, row: PaperOrder, reason: str, code: str) -> ExchangeRejected:
        row.state, row.reason = "rejected", reason
        exc = ExchangeRejected(reason, code=code)
        exc.row = row  # type: ignore[attr-defined]
        return exc

    def _place_atomically(self, order: Any) -> ExchangeOrder:
        spec = self._spec(order.inst_id)
        book = self._book_get() if self.exclusive else None
        with transaction.atomic():
            if book is None:
                account = self._locked_account()
                # One read of the account's orders answers the duplicate check and the margin resting orders hold.
                orders = list(PaperOrder.objects.filter(account=account).filter(
                    Q(client_order_id=order.client_order_id) | Q(state="live")).values_list("client_order_id", "state", "reserved_margin"))
                duplicate = any(cid == order.client_order_id for cid, _, _ in orders)
                reserved = sum((r for _, state, r in orders if state == "live"), ZERO)
            else:  # the only writer: the book in memory is the account, no lock and no read
                account = self._memory_account(book)
                duplicate = self._client_id_known(order.client_order_id)
                reserved = sum((o.reserved_margin for o in book.orders), ZERO)
            if duplicate:
                raise ExchangeRejected(f"Duplicated clOrdId {order.client_order_id}", code="51016")
            last, now = self._last_price(order.inst_id)
            size = round_down_to_lot(order.size, spec.lot_sz) if order.size else order.size
            row = PaperOrder(
                account=account, client_order_id=order.client_order_id, inst_id=order.inst_id, side=order.side,
                pos_side=order.pos_side, ord_type=order.order_type, size=size, price=order.price,
                stop_loss=order.stop_loss, take_profit=order.take_profit, leverage=order.leverage,
                reduce_only=order.reduce_only, created_at=now, updated_at=now,
            )
            if order.reduce_only:
                if book is None:
                    pos = PaperPosition.objects.filter(account=account, inst_id=order.inst_id, pos_side=order.pos_side, status="open").first()
                else:  # in the model's order, as .first() would pick
                    pos = next((p for p in book.positions if p.inst_id == order.inst_id and p.pos_side == order.pos_side), None)
                if pos is None:
                    raise self._reject(row, "no position in this direction to reduce or close", "51169")
                row.size = min(size or pos.size, pos.size)
                self._fill(account, row, pos, spec, self._slipped(last, order.side, spec), self.taker_fee, now, kind="close")
            else:
                if size < spec.min_sz or size <= 0:
                    raise self._reject(row, f"size {size} below minimum {spec.min_sz}", "51020")
                marketable = order.order_type == "market" or (
                    (order.side == "buy" and order.price >= last) or (order.side == "sell" and order.price <= last)
                )
                # The open positions, read once: their margins for the check, and the one a fill adds to.
                open_positions = list(PaperPosition.objects.filter(account=account, status="open")) if book is None else book.positions
                available = account.cash - sum((p.margin for p in open_positions), ZERO) - reserved
                if marketable:
                    px = self._slipped(last, order.side, spec)
                    if order.order_type == "limit":  # never worse than the limit
                        px = min(px, order.price) if order.side == "buy" else max(px, order.price)
                    self._require_margin(account, px * size * spec.ct_val, order.leverage, self.taker_fee, row, available=available)
                    pos = self._fill(account, row, None, spec, px, self.taker_fee, now, kind="open", open_positions=open_positions)
                else:
                    need = order.price * size * spec.ct_val
                    self._require_margin(account, need, order.leverage, self.maker_fee, row, available=available)
                    row.reserved_margin = q(need / order.leverage + need * self.maker_fee)
                    row.save()
                    pos = None
        placed = self._as_exchange_order(row)
        if book is not None:
            self._book_keep(book, account, positions=[pos] if pos is not None else [], orders=[row])
            self._client_id_add(row.client_order_id)
        return placed

    def _slipped(self, last: Decimal, side: str, spec: Instrument) -> Decimal:
        factor = 1 + self.slippage if side == "buy" else 1 - self.slippage
        return round_to_tick(last * factor, spec.tick_sz)

    def _require_margin(
        self, account: PaperAccount, notional: Decimal, leverage: Decimal, fee_rate: Decimal, row: PaperOrder,
        *, available: Decimal | None = None,
    ) -> None:
        """`available`: the caller's figure from reads made under this same account lock (else read here)."""
        need = notional / leverage + notional * fee_rate
        available = self._available(account) if available is None else available
        if need > available:
            raise self._reject(row, f"Order failed. Insufficient USDT margin in account (needs {q(need)}, available {q(available)})", "51008")

    def _fill(
        self, account: PaperAccount, row: PaperOrder | None, pos: PaperPosition | None, spec: Instrument,
        px: Decimal, fee_rate: Decimal, ts: datetime, *, kind: str, size: Decimal | None = None,
        open_positions: list[PaperPosition] | None = None,
    ) -> PaperPosition:
        """Apply one fill to the book: cash, position, fill row, order row.

        `open_positions`: the account's open positions as the caller read them under the same lock
        (an opening fill adds to the matching one, else it is looked up here).
        """
        ct_val = spec.ct_val
        size = size if size is not None else row.size  # type: ignore[union-attr]
        fee = q(px * size * ct_val * fee_rate)
        pnl = ZERO
        if kind == "open":
            if open_positions is not None:  # in the model's ordering, as .first() below would pick
                pos = next((p for p in open_positions if p.inst_id == row.inst_id and p.pos_side == row.pos_side), None)  # type: ignore[union-attr]
            else:
                pos = PaperPosition.objects.filter(account=account, inst_id=row.inst_id, pos_side=row.pos_side, status="open").first()  # type: ignore[union-attr]
            margin = q(px * size * ct_val / row.leverage)  # type: ignore[union-attr]
            if pos is None:
                pos = PaperPosition(
                    account=account, inst_id=row.inst_id, pos_side=row.pos_side, size=size, max_size=size,  # type: ignore[union-attr]
                    avg_px=px, leverage=row.leverage, margin=margin, opened_at=ts, last_funding_at=ts,  # type: ignore[union-attr]
                    open_client_order_id=row.client_order_id,  # type: ignore[union-attr]
                )
            else:
                pos.avg_px = q((pos.avg_px * pos.size + px * size) / (pos.size + size))
                pos.size += size
                pos.max_size = max(pos.max_size, pos.size)
                pos.margin += margin
            if row is not None and row.stop_loss is not None:
                pos.stop_loss = row.stop_loss
            if row is not None and row.take_profit is not None:
                pos.take_profit = row.take_profit
        else:
            assert pos is not None
            sign = 1 if pos.pos_side == "long" else -1
            pnl = q(sign * (px - pos.avg_px) * size * ct_val)
            released = q(pos.margin * size / pos.size)
            pos.close_avg_px = q(((pos.close_avg_px or ZERO) * pos.closed_size + px * size) / (pos.closed_size + size))
            pos.closed_size += size
            pos.size -= size
            pos.margin -= released
            pos.realized_pnl += pnl
            if pos.size <= 0:
                pos.status, pos.closed_at, pos.close_reason, pos.margin = "closed", ts, kind, ZERO
                self.closes += 1
        pos.fees += fee
        pos.save()
        account.cash = q(account.cash + pnl - fee)
        account.save(update_fields=["cash", "updated_at"])
        if row is not None:
            row.avg_px = q(((row.avg_px or ZERO) * row.filled_size + px * size) / (row.filled_size + size))
            row.filled_size += size
            row.fee += fee
            row.state = "filled" if row.filled_size >= row.size else "partially_filled"
            row.reserved_margin = ZERO
            row.updated_at = ts
            # A market order that fills at once reaches here unsaved: one INSERT with its final state.
            row.save()
        PaperFill.objects.create(
            account=account, order=row, position=pos, inst_id=pos.inst_id, kind=kind, size=size, price=px, fee=fee, pnl=pnl, ts=ts,
            side=row.side if row is not None else ("sell" if pos.pos_side == "long" else "buy"),
        )
        return pos

    def close_position(self, *, inst_id: str, pos_side: str, client_order_id: str = "") -> ExchangeOrder | None:
        spec = self._spec(inst_id)
        book = self._book_get() if self.exclusive else None
        try:
            with transaction.atomic():
                if book is None:
                    account = self._locked_account()
                    pos = PaperPosition.objects.filter(account=account, inst_id=inst_id, pos_side=pos_side, status="open").first()
                else:  # the only writer: the book in memory is the account (positions in the model's order)
                    account = self._memory_account(book)
                    pos = next((p for p in book.positions if p.inst_id == inst_id and p.pos_side == pos_side), None)
                if pos is None:
                    return None
                last, now = self._last_price(inst_id)
                side = "sell" if pos_side == "long" else "buy"
                cl_ord_id = client_order_id or f"close{pos.pk}x{int(now.timestamp())}"
                if book is None or self._client_id_known(cl_ord_id):
                    existing = PaperOrder.objects.filter(account=account, client_order_id=cl_ord_id).first()
                    if existing is not None:
                        return self._as_exchange_order(existing)
                # Unsaved: the fill writes it once, with its final state (one INSERT, not an INSERT and an UPDATE).
                row = PaperOrder(
                    account=account, client_order_id=cl_ord_id, inst_id=inst_id, side=side, pos_side=pos_side, ord_type="market",
                    size=pos.size, reduce_only=True, leverage=pos.leverage, created_at=now, updated_at=now,
                )
                self._fill(account, row, pos, spec, self._slipped(last, side, spec), self.taker_fee, now, kind="close")
        except BaseException:
            self._changed()  # rolled back: the memory copy (whose rows may have been changed) is read again
            raise
        closed = self._as_exchange_order(row)
        if book is not None:
            self._book_keep(book, account, positions=[pos])
            self._client_id_add(cl_ord_id)
        return closed

    def cancel_order(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None:
        self._changed()
        with transaction.atomic():
            self._locked_account()
            row = PaperOrder.objects.filter(account_id=self.account_id, client_order_id=client_order_id).first()
            if row is None:
                return None
            if row.state == "live":
                row.state, row.reserved_margin, row.updated_at = "canceled", ZERO, self.now()
                row.save()
            return self._as_exchange_order(row)

    def cancel_algo_orders(self, *, inst_id: str) -> int:
        self._changed()
        return PaperPosition.objects.filter(account_id=self.account_id, inst_id=inst_id, status="open").exclude(
            stop_loss=None, take_profit=None
        ).update(stop_loss=None, take_profit=None)

    def get_order(self, *, inst_id: str, client_order_id: str) -> ExchangeOrder | None:
        row = PaperOrder.objects.filter(account_id=self.account_id, client_order_id=client_order_id).first()
        return self._as_exchange_order(row) if row else None

    def _position(self, pos: PaperPosition, mark: Decimal) -> Position:
        spec = self._spec(pos.inst_id)
        return Position(
            inst_id=pos.inst_id, pos_side=pos.pos_side, size=pos.size, avg_px=pos.avg_px,
            notional_usd=q(pos.size * spec.ct_val * mark), leverage=pos.leverage,
            unrealized_pnl=q(self._upl(pos, mark, spec.ct_val)), margin=pos.margin,
            liq_px=q(self.liquidation_price(pos, spec.ct_val)), mark_px=mark, stop_loss=pos.stop_loss,
            take_profit=pos.take_profit, pos_id=str(pos.pk), opened_at=pos.opened_at,
        )

    def _mark(self, inst_id: str) -> Decimal:
        return self._last_price(inst_id)[0]

    def positions(self) -> list[Position]:
        if self.exclusive:
            return [self._position(pos, self._mark(pos.inst_id)) for pos in self._book_get().positions]
        self.flush()
        rows = list(PaperPosition.objects.filter(account_id=self.account_id, status="open"))
        if not rows:
            return []
        # The last prices of the positions' instruments in one query (a query per position before).
        marks = {p.inst_id: p for p in PaperPrice.objects.filter(account_id=self.account_id, inst_id__in={r.inst_id for r in rows})}
        out = []
        for pos in rows:
            mark = marks.get(pos.inst_id)
            if mark is None or mark.last is None or mark.ts is None:  # what _last says about a missing price
                raise ExchangeRejected(f"no price known for {pos.inst_id} yet: call set_price or process_bar first", code="51000")
            out.append(self._position(pos, mark.last))
        return out

    def account(self) -> AccountState:
        return self.account_and_positions()[0]

    def account_and_positions(self) -> tuple[AccountState, list[Position]]:
        """The account and its open positions from ONE read of the positions (account() needs them anyway)."""
        positions = self.positions()
        if self.exclusive:
            book = self._book_get()
            cash = book.cash
            available = cash - sum((p.margin for p in book.positions), ZERO) - sum((o.reserved_margin for o in book.orders), ZERO)
        else:
            cash, reserved = self._cash_and_reserved()
            # The same positions' margins as the equity below (one read, so both describe one moment).
            available = cash - sum((p.margin for p in positions), ZERO) - reserved
        upl = sum((p.unrealized_pnl for p in positions), ZERO)
        margin = sum((p.margin for p in positions), ZERO)
        return AccountState(
            equity=cash + upl, available_balance=available, margin_used=margin,
            unrealized_pnl=upl, cash=cash,
        ), positions

    def closed_positions(self, *, since: datetime | None = None) -> list[ClosedPosition]:
        rows = PaperPosition.objects.filter(account_id=self.account_id, status="closed")
        if since is not None:
            rows = rows.filter(closed_at__gte=since)
        return [
            ClosedPosition(
                inst_id=p.inst_id, pos_side=p.pos_side, pos_id=str(p.pk), opened_at=p.opened_at, closed_at=p.closed_at,  # type: ignore[arg-type]
                open_avg_px=p.avg_px, close_avg_px=p.close_avg_px or ZERO, size=p.closed_size, pnl=p.realized_pnl,
                fee=p.fees, funding=p.funding, liq_penalty=p.liq_penalty, close_reason=p.close_reason, leverage=p.leverage,
            )
            for p in rows.order_by("closed_at", "id")
        ]

    # --- prices in -----------------------------------------------------------------------
    def set_funding_rate(self, inst_id: str, rate: Decimal | None) -> None:
        """The funding rate charged at the next settlements (None: unknown, nothing is charged)."""
        if self.exclusive and inst_id in self._prices:
            # The price row exists (its price is in memory) and only this instance reads the rate back
            # (`_advance`, after a flush): kept in memory, written with the price on `flush()`.
            self._funding[inst_id] = rate
            self._funding_dirty.add(inst_id)
            return
        row, _ = PaperPrice.objects.get_or_create(account_id=self.account_id, inst_id=inst_id)
        row.funding_rate = rate
        row.save(update_fields=["funding_rate"])

    def set_price(self, inst_id: str, price: Decimal, ts: datetime) -> None:
        if not self.exclusive and self._price_tick(inst_id, price=price, ts=ts):
            return
        self._advance(inst_id, ts=ts, open_=price, high=price, low=price, close=price)

    def _price_tick(self, inst_id: str, *, price: Decimal, ts: datetime) -> bool:
        """A live cycle's tick on an instrument with nothing on it, in ONE statement: only its price moves.

        Most COLLECTING stages mark an instrument with no position and no resting order;
        the full path (spec, account lock, positions, then the same UPDATE) took six
        statements and a transaction for that. No account lock is needed: the only writer
        that can put a position or a limit order on this instrument is its own EXECUTING,
        which never runs beside its COLLECTING (one cycle per instrument at a time), and a
        close elsewhere only sends the next tick down the full path. False (nothing
        written): something is open on it, no price row yet, or the row's clock is later;
        the full path decides (and refuses an unknown instrument).
        """
        mine = Q(account_id=self._account_id) if self._account_id is not None else Q(account__name=self._account_name)
        # Only on an account already on this price's clock; anything else (a first price, a mixed one) goes the
        # full path, which fixes or checks the account's clock under its lock (`_clock_admit`).
        clock = "wall" if self._wall_like(ts) else "virtual"
        return self._price_write(mine & Q(account__clock=clock), inst_id, price=price, ts=ts)

    @staticmethod
    def _wall_like(ts: datetime) -> bool:
        return abs((ts - timezone.now()).total_seconds()) <= wall_tolerance_seconds()

    def _clock_admit(self, account: PaperAccount, ts: datetime) -> None:
        """Under the account's lock: fix the account's clock with its first price, refuse a price of the other."""
        wall_like = self._wall_like(ts)
        if not account.clock:
            account.clock = "wall" if wall_like else "virtual"
            PaperAccount.objects.filter(pk=account.pk).update(clock=account.clock)
            return
        if account.clock == "wall" and not wall_like:
            raise ClockMixed(
                f"paper account {account.name!r} follows the wall clock: a price at {ts.isoformat()} "
                f"({(ts - timezone.now()).total_seconds():+.0f}s from now) is a virtual time, refused (live and "
                "virtual times never mix in one account; a replay or the demo has its own)", code="clock")
        if account.clock == "virtual" and wall_like:
            latest = PaperPrice.objects.filter(account_id=account.pk, ts__isnull=False).order_by("-ts").values_list(
                "ts", flat=True).first()
            if latest is not None and (ts - latest).total_seconds() > wall_tolerance_seconds():
                raise ClockMixed(
                    f"paper account {account.name!r} follows a virtual clock (at {latest.isoformat()}): a price at "
                    f"the wall time {ts.isoformat()} is refused (live and virtual times never mix in one account)",
                    code="clock")

    @staticmethod
    def _price_write(mine: Q, inst_id: str, *, price: Decimal, ts: datetime) -> bool:
        """The one UPDATE both price-only paths use: the instrument's price and clock, only when no position
        and no resting limit order is on it, a price row exists and its clock is not later. True: written."""
        open_position = PaperPosition.objects.filter(account_id=OuterRef("account_id"), inst_id=inst_id, status="open")
        live_limit = PaperOrder.objects.filter(account_id=OuterRef("account_id"), inst_id=inst_id, state="live", ord_type="limit")
        written = PaperPrice.objects.filter(mine, inst_id=inst_id, ts__lte=ts).exclude(Exists(open_position)).exclude(
            Exists(live_limit)).update(last=price, ts=ts)
        return bool(written)

    def process_bar(self, inst_id: str, bar: Any) -> None:
        """Advance the book through one candle: funding, SL/TP, liquidation, limit fills."""
        self._advance(inst_id, ts=bar.ts, open_=Decimal(bar.open), high=Decimal(bar.high), low=Decimal(bar.low), close=Decimal(bar.close))

    def _advance(self, inst_id: str, *, ts: datetime, open_: Decimal, high: Decimal, low: Decimal, close: Decimal) -> None:
        if self.exclusive and inst_id in self._prices and self._quiet_bar(inst_id, ts, high, low):
            # Nothing reacts: only the price and the clock move (written before anything reads them).
            self._prices[inst_id] = (q(close), max(ts, self._prices[inst_id][1]))
            self._dirty.add(inst_id)
            return
        spec = self._spec(inst_id)  # an unknown instrument is refused (51001) before anything is written
        if self.exclusive and inst_id in self._prices and inst_id in self._funding:
            self._advance_in_memory(inst_id, spec, ts=ts, open_=open_, high=high, low=low, close=close)
            return
        self.flush()
        before = self._book
        self._changed()
        with transaction.atomic():
            account = self._locked_account()
            if not self.exclusive:  # a replay's account is its own, always on its virtual clock
                self._clock_admit(account, ts)
            # The open positions are read once, under the account lock (funding and triggers use them).
            positions = list(PaperPosition.objects.filter(account=account, inst_id=inst_id, status="open"))
            if not positions and self._price_only(account, inst_id, ts=ts, close=close):
                return
            limits = list(PaperOrder.objects.filter(account=account, inst_id=inst_id, state="live", ord_type="limit"))
            price_row, _ = PaperPrice.objects.get_or_create(account=account, inst_id=inst_id)
            if positions:
                self._apply_funding(account, inst_id, ts, open_, price_row.funding_rate, positions)
                for pos in positions:
                    self._triggers(account, pos, spec, ts, open_, high, low)
            for row in limits:
                if self._crossed(row, high, low):
                    self._fill(account, row, None, spec, row.price, self.maker_fee, ts, kind="open")  # type: ignore[arg-type]
            price_row.last, price_row.ts = close, max(ts, price_row.ts) if price_row.ts else ts
            # Only the price and the clock: a funding rate set meanwhile (set_funding_rate) is not overwritten.
            price_row.save(update_fields=["last", "ts"])
        if self.exclusive:
            self._prices[inst_id] = (q(close), price_row.ts)
            self._funding[inst_id] = price_row.funding_rate
            if before is not None and not limits:
                # The rows this bar wrote are the ones in hand (read under the lock, saved): the
                # book follows them instead of being read again (funding and SL/TP are most of the
                # bars that get here). With a limit order a fill may have opened a position: read.
                others = _Book(cash=before.cash, orders=before.orders, positions=[p for p in before.positions if p.inst_id != inst_id])
                self._book_keep(others, account, positions=positions)

    def _advance_in_memory(self, inst_id: str, spec: Instrument, *, ts: datetime, open_: Decimal, high: Decimal, low: Decimal,
                           close: Decimal) -> None:
        """`_advance` of the exclusive instance on its book in memory: the rows `_advance` would read
        under the account lock (account, the instrument's open positions and resting limit orders,
        the funding rate) are the ones in hand, since nothing else writes the account. The bar's
        writes are the same; the price and clock move in memory (written on `flush()`).

        No savepoint inside a caller's transaction: a bar that fails leaves that transaction to roll
        back whole (Django refuses further queries in it), so none of its writes can be kept. The
        replay's walker, the one caller, lets such an error end the replay and its batch anyway.
        """
        book = self._book_get()
        positions = [p for p in book.positions if p.inst_id == inst_id]  # in the model's order, as the read gives them
        limits = [o for o in book.orders if o.inst_id == inst_id and o.ord_type == "limit"]
        filled = False
        try:
            with transaction.atomic(savepoint=False):
                account = self._memory_account(book)
                if positions:
                    self._apply_funding(account, inst_id, ts, open_, self._funding[inst_id], positions)
                    for pos in positions:
                        self._triggers(account, pos, spec, ts, open_, high, low)
                for row in limits:
                    if self._crossed(row, high, low):
                        self._fill(account, row, None, spec, row.price, self.maker_fee, ts, kind="open")  # type: ignore[arg-type]
                        filled = True
        except BaseException:
            self._changed()  # rolled back: the memory copy (whose rows may have been changed) is read again
            raise
        self._prices[inst_id] = (q(close), max(ts, self._prices[inst_id][1]))
        self._dirty.add(inst_id)
        if filled:
            self._changed()  # a limit fill may have opened a position: read the book again
        else:
            self._book_keep(book, account)

    def _price_only(self, account: PaperAccount, inst_id: str, *, ts: datetime, close: Decimal) -> bool:
        """The usual live tick with no position on the instrument, in one UPDATE: only its price moves.

        The caller holds the account lock (as every writer of the book does) and found no open
        position, so none can appear before the write. False (nothing written) when a resting
        limit order waits on the instrument, there is no price row yet or its clock is later: the
        full path then runs in the same transaction.
        """
        # The statement's own no-position check is redundant under the lock, and costs nothing measurable.
        written = self._price_write(Q(account_id=account.pk), inst_id, price=close, ts=ts)
        if written and self.exclusive:
            self._prices[inst_id] = (q(close), ts)
        return bool(written)

    @staticmethod
    def _crossed(row: PaperOrder, high: Decimal, low: Decimal) -> bool:
        return (row.side == "buy" and low <= row.price) or (row.side == "sell" and high >= row.price)  # type: ignore[operator]

    def _trigger_hits(self, pos: PaperPosition, ct_val: Decimal, high: Decimal, low: Decimal) -> tuple[Decimal, bool, bool, bool]:
        """(liquidation price, liquidation touched, stop touched, take-profit touched) for one bar."""
        long = pos.pos_side == "long"
        liq = self.liquidation_price(pos, ct_val)
        liq_hit = (low <= liq) if long else (high >= liq)
        stop, tp = pos.stop_loss, pos.take_profit
        stop_hit = stop is not None and ((long and low <= stop) or (not long and high >= stop))
        tp_hit = tp is not None and ((long and high >= tp) or (not long and low <= tp))
        return liq, liq_hit, stop_hit, tp_hit

    def _apply_funding(
        self, account: PaperAccount, inst_id: str, ts: datetime, price: Decimal, rate: Decimal | None, positions: list[PaperPosition],
    ) -> None:
        """Settle every funding time up to `ts` for `positions` (the instrument's open ones, locked account).

        Writes only what a settlement changed: a bar with no funding time in it (one that only
        touched a stop or a take-profit) writes nothing here.
        """
        ct_val = self._spec(inst_id).ct_val
        paid = False
        for pos in positions:
            boundary = next_funding_after(pos.last_funding_at)
            if boundary > ts:
                continue  # no settlement due for this position in this bar: nothing of it to write
            while boundary <= ts:
                if rate is not None:
                    sign = -1 if pos.pos_side == "long" else 1
                    amount = q(sign * pos.size * ct_val * price * rate)
                    PaperFunding.objects.create(account=account, position=pos, inst_id=inst_id, ts=boundary, rate=rate, price=price, amount=amount)
                    pos.funding += amount
                    account.cash = q(account.cash + amount)
                    paid = True
                else:
                    log.warning("paper_funding_rate_unknown", inst_id=inst_id, at=boundary.isoformat())
                pos.last_funding_at = boundary
                boundary = next_funding_after(boundary)
            pos.save(update_fields=["funding", "last_funding_at"])  # all a settlement changes
        if paid:
            account.save(update_fields=["cash", "updated_at"])

    def _triggers(self, account: PaperAccount, pos: PaperPosition, spec: Instrument, ts: datetime, open_: Decimal, high: Decimal, low: Decimal) -> None:
        long = pos.pos_side == "long"
        liq, liq_hit, stop_hit, tp_hit = self._trigger_hits(pos, spec.ct_val, high, low)
        stop, tp = pos.stop_loss, pos.take_profit
        # A gap beyond the liquidation price, or a liquidation price reached before the stop.
        liq_first = liq_hit and (
            (long and open_ <= liq) or (not long and open_ >= liq)
            or stop is None or (long and stop <= liq) or (not long and stop >= liq)
        )
        if liq_first:
            self._liquidate(account, pos, spec, liq, ts)
            return
        side = "sell" if long else "buy"
        if stop_hit:
            px = min(open_, stop) if long else max(open_, stop)  # type: ignore[type-var]  # a gap through the stop fills at the open
            self._system_fill(account, pos, spec, px, ts, "stop_loss", side)
            return
        if tp_hit:
            px = max(open_, tp) if long else min(open_, tp)  # type: ignore[type-var]
            self._system_fill(account, pos, spec, px, ts, "take_profit", side)

    def _system_fill(self, account: PaperAccount, pos: PaperPosition, spec: Instrument, px: Decimal, ts: datetime, kind: str, side: str) -> None:
        self._fill(account, None, pos, spec, px, self.taker_fee, ts, kind=kind, size=pos.size)

    def _liquidate(self, account: PaperAccount, pos: PaperPosition, spec: Instrument, liq: Decimal, ts: datetime) -> None:
        sign = 1 if pos.pos_side == "long" else -1
        qty = pos.size * spec.ct_val
        px = q(liq)
        pnl = q(sign * (px - pos.avg_px) * qty)
        penalty = q(pos.margin + pnl)  # what is left of the margin goes to the insurance fund
        lost = pos.margin
        PaperFill.objects.create(
            account=account, order=None, position=pos, inst_id=pos.inst_id, kind="liquidation", size=pos.size, price=px,
            fee=penalty, pnl=pnl, ts=ts, side="sell" if pos.pos_side == "long" else "buy",
        )
        pos.close_avg_px = px
        pos.closed_size += pos.size
        pos.size = ZERO
        pos.realized_pnl += pnl
        pos.liq_penalty += penalty
        pos.status, pos.closed_at, pos.close_reason, pos.margin = "closed", ts, "liquidation", ZERO
        pos.save()
        self.closes += 1
        account.cash = q(account.cash - lost)
        account.save(update_fields=["cash", "updated_at"])
