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
from datetime import datetime, timezone as dt_timezone
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import FilteredRelation, Q
from django.utils import timezone

from execution.exchanges.base import (
    AccountState,
    ClosedPosition,
    Exchange,
    ExchangeOrder,
    ExchangeRejected,
    Position,
)
from execution.models import PaperAccount, PaperFill, PaperOrder, PaperPosition, PaperPrice, row_as_read
from execution.validation import round_down_to_lot, round_to_tick
from execution.exchanges.paper_market import ZERO, PaperMarket, _Book, next_funding_after, q
from market.models import Instrument
import structlog

log = structlog.get_logger(__name__)


class PaperExchange(PaperMarket, Exchange):
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
