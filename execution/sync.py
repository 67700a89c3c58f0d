"""Account sync: orders, positions, balance and closed trades reconciled with the exchange's own numbers.

Every trade the exchange closed (a stop, a take-profit, a liquidation, our own close) is journaled here with the
exchange's fill, price and time; an order lost between its intent row and the exchange is settled or marked never
sent; a fill whose trade was never written gets it (#16).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, Exists, F, OuterRef, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from brain.schemas import Action
from execution.bot import _bot_update, risk_trade_closed
from execution.exchanges.base import ClosedPosition, Exchange, ExchangeError
from execution.models import ORDER_TRANSITIONS, Order, OrderState, transition
from execution.outages import exchange_outage_end
from execution.selectors import bot_scope
from execution.services import _note, _settle, trade_open_write
from journal.models import Cycle, Direction, EventLevel, Mode, Trade, TradeStatus
from journal.services import event_record
import structlog

log = structlog.get_logger(__name__)


# --- Account sync ------------------------------------------------------------------------
@dataclass
class SyncResult:
    equity: Decimal
    available_balance: Decimal
    open_positions: int
    closed_trade_ids: list[int] = field(default_factory=list)
    orders_updated: list[str] = field(default_factory=list)
    trades_recovered: list[int] = field(default_factory=list)  # opening fills journaled late (#16)


def order_in_flight_seconds() -> float:
    """How long a PENDING order may still be in the hands of the EXECUTING stage that wrote it: the stage task's
    hard time limit plus a hop (the cycle's stage limit). Past it no worker can still be sending it (Celery's hard
    limit ends the task), so the account sync looks it up and settles it, or marks it never sent."""
    return float(settings.CELERY_TASK_TIME_LIMIT + settings.CYCLE_STAGE_GRACE_SECONDS)


def _never_sent(order: Order) -> bool:
    """A PENDING order the exchange does not know, past the stage limit: its worker died before the call went out.

    Marked CANCELED, so nothing sends it late (a redelivered EXECUTING finds it final); the cycle that decided it
    has been swept INTERRUPTED by then. True when this call marked it.
    """
    with transaction.atomic():
        row = Order.objects.select_for_update().filter(pk=order.pk, state=OrderState.PENDING).first()
        if row is None:
            return False
        note = "never reached the exchange: its worker was lost before the call; not sent late"
        transition(row, OrderState.CANCELED, table=ORDER_TRANSITIONS, now=timezone.now(), note=note)
        row.error_message = note
        row.save()
    event_record(kind="order_never_sent", message=f"{row.client_order_id}: {note}", level=EventLevel.WARNING,
                 cycle_id=row.cycle_id, mode=row.mode)
    return True


def order_fill_journal(*, order: Order, exchange: Exchange) -> Trade | None:
    """The Trade of a filled opening order whose trade was never journaled (its worker died between the two
    writes), from the exchange's own record of the order; None when there is nothing to journal.

    A fill with an open trade of the same instrument and direction is left alone: it may have been added to that
    trade, and adding it again would double the size (journaled as a warning for a person to look at).
    """
    if order.action not in (Action.OPEN_LONG, Action.OPEN_SHORT) or order.filled_size <= 0:
        return None
    if Trade.objects.filter(client_order_id=order.client_order_id).exists():
        return None
    direction = Direction.LONG if order.pos_side == "long" else Direction.SHORT
    if Trade.objects.filter(instrument__inst_id=order.inst_id, direction=direction, mode=order.mode,
                            run_id=order.run_id, status=TradeStatus.OPEN).exists():
        note = (f"filled without a trade of its own while an open {direction} trade of {order.inst_id} exists: "
                "not journaled twice (a person should look)")
        if note not in order.error_message:  # said once, not at every sync
            _note(order, note)
            event_record(kind="fill_without_trade", level=EventLevel.WARNING, cycle_id=order.cycle_id, mode=order.mode,
                         message=f"{order.client_order_id} {note}")
        return None
    try:
        fill = exchange.get_order(inst_id=order.inst_id, client_order_id=order.client_order_id)
    except ExchangeError as exc:
        log.warning("fill_lookup_failed", clOrdId=order.client_order_id, error=str(exc))
        return None
    if fill is None or fill.filled_size <= 0:
        return None
    trade, written = trade_open_write(order=order, fill=fill, context=dict(order.trade_context))
    if written and trade is not None:  # not when another sync recovered it at the same moment (it says so)
        event_record(kind="trade_recovered", level=EventLevel.WARNING, cycle_id=order.cycle_id, mode=order.mode,
                     message=f"{order.client_order_id}: the exchange filled it and its trade was never journaled "
                             f"(its worker was lost); trade {trade.pk} opened from the exchange's fill")
    return trade


# How far back the sync looks for an opening fill without its trade (a worker lost between the two writes).
FILL_JOURNAL_LOOKBACK = timedelta(days=2)


def _fills_journal(*, exchange: Exchange, mode: str, before: datetime) -> list[int]:
    """Every opening order the exchange filled has its Trade (`order_fill_journal`), for the orders past the
    in-flight window (`before`): a younger one may be between the fill's write and the trade's right now."""
    since = timezone.now() - FILL_JOURNAL_LOOKBACK
    missing = list(Order.objects.filter(
        mode=mode, run_id="", action__in=(Action.OPEN_LONG, Action.OPEN_SHORT), filled_size__gt=0,
        state__in=(OrderState.FILLED, OrderState.PARTIALLY_FILLED), created_at__gte=since, created_at__lt=before,
    ).exclude(Exists(Trade.objects.filter(client_order_id=OuterRef("client_order_id")))).order_by("created_at"))
    recovered: list[int] = []
    for order in missing:
        trade = order_fill_journal(order=order, exchange=exchange)
        if trade is not None:
            recovered.append(trade.pk)
    return recovered


# (inst_id, closed_at) -> the indicators per timeframe of the caller's latest snapshot at or before
# that time (and no older than EXIT_SNAPSHOT_MAX_AGE), or None: what a replay knows in memory.
ExitIndicators = Callable[[str, datetime], "dict[str, Any] | None"]


def account_sync(*, exchange: Exchange, mode: str = Mode.LIVE, run_id: str | None = None,
                 exit_indicators: ExitIndicators | None = None) -> SyncResult:
    """Reconcile orders, positions, balance and closed trades with the exchange's own numbers.

    `run_id` limits a replay's sync to its own orders and trades (and its own bot state).
    `exit_indicators`: where a close the exchange made finds the market's indicators before
    the journal is asked (a replay's cycles are written per batch; see `_exit_indicators`)."""
    scope = bot_scope(mode=mode, run_id=run_id or "")
    now = exchange.now()
    account = exchange.account()
    positions = exchange.positions()
    if run_id is None:  # the live (or demo) bot: the first answer after an outage verifies the positions' stops
        exchange_outage_end(positions=positions, mode=mode)
    result = SyncResult(equity=account.equity, available_balance=account.available_balance, open_positions=len(positions))
    in_flight = timezone.now() - timedelta(seconds=order_in_flight_seconds())
    orders = Order.objects.filter(state__in=[OrderState.SUBMITTED, OrderState.PARTIALLY_FILLED, OrderState.PENDING], mode=mode)
    trades = Trade.objects.filter(status=TradeStatus.OPEN, mode=mode)
    if run_id is not None:
        orders, trades = orders.filter(run_id=run_id), trades.filter(run_id=run_id)
    for order in orders:
        if order.state == OrderState.PENDING and order.created_at > in_flight:
            continue  # may be in flight in another worker right now
        try:
            found = exchange.get_order(inst_id=order.inst_id, client_order_id=order.client_order_id)
        except ExchangeError as exc:
            log.warning("order_lookup_failed", clOrdId=order.client_order_id, error=str(exc))
            continue
        if found is None:
            if order.state == OrderState.PENDING and _never_sent(order):
                result.orders_updated.append(order.client_order_id)
            continue
        before = order.state
        order = _settle(order, found, _StoredApproval(order), dict(order.trade_context))
        if order.state != before:
            result.orders_updated.append(order.client_order_id)
    if run_id is None:  # a replay runs in one process: nothing of it is lost between a fill and its trade
        result.trades_recovered = _fills_journal(exchange=exchange, mode=mode, before=in_flight)
    live = {(p.inst_id, p.pos_side) for p in positions}
    open_trades = list(trades.select_related("instrument").order_by("opened_at"))
    pending = [t for t in open_trades if (t.instrument.inst_id, "long" if t.direction == Direction.LONG else "short") not in live]
    if pending:
        closed = exchange.closed_positions(since=min(t.opened_at for t in pending) - timedelta(minutes=1))
        used: set[str] = set()
        for trade in pending:
            match = _match_closed(trade, closed, used)
            if match is None:
                continue
            used.add(match.pos_id)
            if trade_close_record(trade=trade, closed=match, exit_indicators=exit_indicators) is None:
                continue  # another sync (the orders worker's other process, an order's own sync) closed it first
            result.closed_trade_ids.append(trade.pk)
            risk_trade_closed(pnl=match.realized_pnl, now=match.closed_at, scope=scope)
    _bot_figures_sync(scope, equity=account.equity, day=now.date())
    return result


def _bot_figures_sync(scope: str, *, equity: Decimal, day: date) -> None:
    """The sync's bookkeeping on the bot state: the day's starting equity when the day has none yet,
    and the peak equity raised to `equity`.

    One UPDATE whose conditions the database evaluates on the row as it is (the locked
    read-modify-write did the same in a savepoint and three statements).
    """
    _bot_update(scope,
                day_start_equity=Case(When(day_start_date__isnull=True, then=Value(equity)), default=F("day_start_equity")),
                day_start_date=Coalesce(F("day_start_date"), Value(day)),
                peak_equity=Case(When(Q(peak_equity__isnull=True) | Q(peak_equity__lt=equity), then=Value(equity)),
                                 default=F("peak_equity")))


class _StoredApproval:
    """What `_settle` needs from an approval, rebuilt from the stored order row."""

    def __init__(self, order: Order) -> None:
        self.kind = order.approved.get("kind", "close" if order.reduce_only else "open")


def _match_closed(trade: Trade, closed: list[ClosedPosition], used: set[str]) -> ClosedPosition | None:
    side = "long" if trade.direction == Direction.LONG else "short"
    for cp in closed:
        if cp.pos_id in used or cp.inst_id != trade.instrument.inst_id or cp.pos_side != side:
            continue
        if cp.closed_at >= trade.opened_at and cp.opened_at >= trade.opened_at - timedelta(minutes=1):
            return cp
    return None


def trade_close_record(*, trade: Trade, closed: ClosedPosition,
                       exit_indicators: ExitIndicators | None = None) -> Trade | None:
    """Close the journal Trade with the exchange's numbers (net PnL, fees, funding).

    The close is claimed by a conditional UPDATE (the trade still open): two account syncs that run at once (the
    orders worker has several processes; a close order syncs too) both find the closed position, and only the one
    that closes the trade counts its loss and asks for its review. None: another one closed it first."""
    reason = closed.close_reason
    # Only a close the exchange does not explain (a close order's fill) can be ours: a stop is the stop.
    own_close = _own_close_order(trade, closed) if reason in ("", "close") else None
    if reason in ("", "close"):
        reason = _exit_reason(trade, closed, own_close)
    trade.indicators_exit = _exit_indicators(trade, closed, own_close, exit_indicators)
    margin = trade.entry_price * trade.size * trade.instrument.ct_val / (trade.leverage or 1)
    trade.exit_price = closed.close_avg_px
    trade.closed_at = closed.closed_at
    trade.duration_seconds = int((closed.closed_at - trade.opened_at).total_seconds())
    trade.pnl_usd = closed.realized_pnl
    trade.pnl_pct = (closed.realized_pnl / margin).quantize(Decimal("1e-8")) if margin else None
    trade.fees_usd = closed.fee + closed.liq_penalty
    trade.funding_usd = closed.funding
    # A person's flatten reason can be a sentence: cut to the column, or PostgreSQL refuses the close and every
    # later account sync failed on it, leaving the trade open after its position had closed (#16).
    trade.exit_reason = reason[:_EXIT_REASON_MAX]
    trade.status = TradeStatus.CLOSED
    # Only what a close changes: the other columns (the entry's JSON among them) are as read.
    trade.updated_at = timezone.now()
    won = Trade.objects.filter(pk=trade.pk, status=TradeStatus.OPEN).update(
        **{name: getattr(trade, name) for name in _CLOSE_FIELDS})
    return trade if won else None


_EXIT_REASON_MAX = Trade._meta.get_field("exit_reason").max_length
_CLOSE_FIELDS = ("indicators_exit", "exit_price", "closed_at", "duration_seconds", "pnl_usd", "pnl_pct", "fees_usd",
                 "funding_usd", "exit_reason", "status", "updated_at")


def _own_close_order(trade: Trade, closed: ClosedPosition) -> Order | None:
    """Our latest reducing order on the trade's instrument and side since it opened, in the trade's mode and run.

    Mode and run: a replay and the live bot share the orders table, and a replay's
    close on the same instrument and side says nothing about why a live position
    closed (nor another run's).
    """
    return Order.objects.filter(mode=trade.mode, run_id=trade.run_id, inst_id=trade.instrument.inst_id, reduce_only=True,
                                pos_side=closed.pos_side, created_at__gte=trade.created_at).order_by("-created_at").first()


def _exit_reason(trade: Trade, closed: ClosedPosition, own_close: Order | None) -> str:
    """The exchange did not say why: our own close order says, else the nearest of SL/TP."""
    if own_close is not None:
        return str(own_close.trade_context.get("exit_reason") or "signal")
    px = closed.close_avg_px
    for name, level in (("stop_loss", trade.stop_loss), ("take_profit", trade.take_profit)):
        if level and px and abs(px - level) / level <= Decimal("0.005"):
            return name
    return "signal"


# How old the last full snapshot may be to stand for the market at a close the exchange made (SL/TP,
# liquidation): three 5-minute cycles. Older, the trade says "unknown" (None) rather than something stale.
EXIT_SNAPSHOT_MAX_AGE = timedelta(minutes=15)


def _exit_indicators(trade: Trade, closed: ClosedPosition, own_close: Order | None,
                     recent: ExitIndicators | None = None) -> dict[str, Any] | None:
    """The indicators when the position closed, per timeframe, for the post-trade review.

    A close we ordered carries the snapshot its decision saw (the order's trade
    context). A close the exchange made (stop, take-profit, liquidation) takes the
    instrument's last cycle with a full snapshot at or before the close, if recent
    enough. A replay writes its cycles per batch and keeps most of them compact, so
    it passes `recent`: its last cycle's snapshot, still in memory.
    """
    if own_close is not None and own_close.trade_context.get("indicators_entry"):
        return dict(own_close.trade_context["indicators_entry"])
    if recent is not None:
        found = recent(trade.instrument.inst_id, closed.closed_at)
        if found is not None:
            return found
    snapshot = (
        Cycle.objects.filter(instrument_id=trade.instrument_id, mode=trade.mode, run_id=trade.run_id,
                             as_of__lte=closed.closed_at, as_of__gte=closed.closed_at - EXIT_SNAPSHOT_MAX_AGE)
        .order_by("-as_of").values_list("snapshot", flat=True)[:3]
    )
    for doc in snapshot:  # the newest full one (a cycle that ended at screening may keep a compact one)
        frames = (doc or {}).get("timeframes") if isinstance(doc, dict) else None
        if frames:
            return {tf: (view or {}).get("indicators") for tf, view in frames.items()}
    return None
