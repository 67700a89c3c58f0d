"""What the market does to a paper account (execution.exchanges.paper): prices and the account's clock, candles
(funding settlements, SL/TP triggers, liquidation, resting limit fills), as a mixin of PaperExchange.

The book, orders and fills stay in paper.py; the model both follow is documented there.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from execution.exchanges.base import ExchangeRejected
from execution.models import PaperAccount, PaperFill, PaperFunding, PaperOrder, PaperPosition, PaperPrice
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

class PaperMarket:
    """Prices, the clock and candles applied to the book; mixed into PaperExchange, whose book, lock and fill
    methods (`_spec`, `_book`, `_locked_account`, `_fill`, `flush`, ...) these use."""

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
