"""Execution services: the risk gate's bookkeeping, orders, closes and flattening (the bot's state is in
`execution.bot`, the account sync in `execution.sync`).

Rules kept here: the Order row with its client order id is written (and committed) before
any exchange call and its outcome after; no transaction spans an exchange call; a placement
whose outcome is unknown stays PENDING and is looked up by client order id before anything
else is done with it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from brain.schemas import Decision
from execution.bot import SYSTEM, bot_halt, bot_state_refresh
from execution.exchanges.base import (
    AccountState,
    Exchange,
    ExchangeError,
    ExchangeOrder,
    ExchangeRejected,
    ExchangeUnknownOutcome,
    ExchangeUnreachable,
    Position,
)
from execution.models import (
    ORDER_TRANSITIONS,
    TERMINAL_ORDER_STATES,
    InvalidTransition,
    Order,
    OrderState,
    row_as_read,
    transition,
)
from execution.outages import exchange_unreachable_record
from execution.risk import ApprovedOrder, BotStateView, MarketRef, RiskVerdict, approval_is_genuine, risk_check
from execution.selectors import bot_scope
from execution.validation import to_decimal
from journal.models import Direction, EventLevel, Mode, RiskRejection, Trade, TradeStatus
from journal.services import event_record
from market.models import Instrument
from redaction import redact

EXCHANGE_STATES = {
    "live": OrderState.SUBMITTED, "partially_filled": OrderState.PARTIALLY_FILLED, "filled": OrderState.FILLED,
    "canceled": OrderState.CANCELED, "mmp_canceled": OrderState.CANCELED, "rejected": OrderState.REJECTED,
}



# --- The gate, with its consequences --------------------------------------------------
def risk_gate_run(
    *,
    decision: Decision,
    market: MarketRef,
    account: AccountState,
    positions: list[Position],
    returns_1h: dict[str, list[float]] | None = None,
    instrument: Any = None,
    cycle_id: int | None = None,
    mode: str = Mode.LIVE,
    run_id: str = "",
    now: datetime | None = None,
    bot: BotStateView | None = None,
) -> RiskVerdict:
    """Run the gate against the stored bot state; halt on daily loss / drawdown; record a rejection.

    `bot`: the bot state the caller has just read for this gate (saves a read).
    """
    now = now or market.ts or timezone.now()
    scope = bot_scope(mode=mode, run_id=run_id)
    view = bot_state_refresh(now=now, scope=scope, current=bot)
    verdict = risk_check(decision=decision, market=market, account=account, positions=positions, bot=view,
                         returns_1h=returns_1h, instrument=instrument, cycle_id=cycle_id, now=now)
    failed = dict(verdict.failures)
    # Only a real breach halts (not, say, an unusable equity figure, which merely rejects).
    if "reached the limit" in failed.get("drawdown", ""):
        bot_halt(reason=failed["drawdown"], by=SYSTEM, emergency=True, now=now, scope=scope)
    elif "reached the limit" in failed.get("daily_loss", ""):
        bot_halt(reason=failed["daily_loss"], by=SYSTEM, now=now, scope=scope)
    if not verdict.approved:
        risk_rejection_record(verdict=verdict, decision=decision, account=account, cycle_id=cycle_id, mode=mode)
    return verdict


def risk_rejection_record(*, verdict: RiskVerdict, decision: Decision, account: AccountState | None, cycle_id: int | None, mode: str = Mode.LIVE) -> RiskRejection:
    instrument = Instrument.objects.filter(inst_id=decision.decision.symbol).first()
    state = account.as_json() if isinstance(account, AccountState) else None
    return RiskRejection.objects.create(
        instrument=instrument, cycle_id=cycle_id, mode=mode, decision_json=decision.model_dump(mode="json"),
        failed_rules=[{"rule": r, "reason": why} for r, why in verdict.failures],
        account_state={"account": state, "skipped_rules": [{"rule": r, "reason": why} for r, why in verdict.skipped]},
    )


# --- Orders ---------------------------------------------------------------------------
def _apply_outcome(order: Order, ex: ExchangeOrder, *, now: datetime) -> None:
    """Move the row to the state the exchange reports (through the transitions table)."""
    target = EXCHANGE_STATES.get(ex.state, OrderState.SUBMITTED)
    if order.state == OrderState.PENDING and target not in (OrderState.SUBMITTED, OrderState.REJECTED, OrderState.CANCELED):
        transition(order, OrderState.SUBMITTED, table=ORDER_TRANSITIONS, now=now)
    if order.state != target or target == OrderState.PARTIALLY_FILLED:
        if target in ORDER_TRANSITIONS[order.state]:
            transition(order, target, table=ORDER_TRANSITIONS, now=now)
    order.exchange_order_id = ex.order_id or order.exchange_order_id
    order.filled_size = ex.filled_size
    order.avg_fill_price = ex.avg_px
    order.fee = ex.fee


def order_place(
    *, approved: ApprovedOrder, cycle_id: int | None, trade_context: dict[str, Any] | None = None, exchange: Exchange | None = None,
    instrument: Instrument | None = None,
) -> Order:
    """Send an approved order once. Idempotent by client order id; opening fills start a journal Trade.

    `instrument`: the order's Instrument row when the caller has it (saves the journal trade a read).
    """
    if not approval_is_genuine(approved):
        raise TypeError("order_place accepts only an ApprovedOrder from the risk gate")
    if exchange is None:
        from execution.exchanges import exchange_from_settings

        exchange = exchange_from_settings()
    context = dict(trade_context or {})
    order, created = _order_intent(approved=approved, exchange=exchange, cycle_id=cycle_id, context=context)
    if not created:
        if order.state in TERMINAL_ORDER_STATES:
            return order
        # We may have sent it before: ask the exchange first, never send it twice.
        try:
            found = exchange.get_order(inst_id=order.inst_id, client_order_id=order.client_order_id)
        except ExchangeError as exc:
            _note(order, f"lookup before re-sending failed: {exc}")
            return order
        if found is not None:
            return _settle(order, found, approved, context, instrument)
        if order.state != OrderState.PENDING:
            return order
    try:
        if approved.kind == "open":
            exchange.set_leverage(inst_id=approved.inst_id, leverage=approved.leverage, pos_side=approved.pos_side)
        if approved.kind == "close":
            result = exchange.close_position(inst_id=approved.inst_id, pos_side=approved.pos_side, client_order_id=approved.client_order_id)
        else:
            result = exchange.place_order(approved)
    except ExchangeRejected as exc:
        _reject(order, exc)
        return order
    except ExchangeUnreachable as exc:
        # Not even a connection: the order never left. Canceled, so nothing sends it late; no new entry (#16).
        exchange_unreachable_record(error=str(exc), where="order", mode=order.mode)
        order.refresh_from_db()
        if order.state == OrderState.PENDING:
            transition(order, OrderState.CANCELED, table=ORDER_TRANSITIONS, now=timezone.now(),
                       note=f"exchange unreachable, never sent: {exc}")
            order.error_message = redact(f"exchange unreachable, never sent: {exc}")[:500]
            order.save()
        return order
    except ExchangeUnknownOutcome as exc:
        _note(order, f"outcome unknown, left PENDING: {exc}")
        event_record(kind="order_unknown_outcome", message=f"{order.client_order_id}: {exc}", level=EventLevel.ERROR, cycle_id=cycle_id)
        return order
    except ExchangeError as exc:
        _note(order, f"not placed: {exc}")
        event_record(kind="order_failed", message=f"{order.client_order_id}: {exc}", level=EventLevel.ERROR, cycle_id=cycle_id)
        return order
    if result is None:  # close of a position that is already gone
        order.refresh_from_db()
        transition(order, OrderState.CANCELED, table=ORDER_TRANSITIONS, now=timezone.now(), note="no position to close")
        order.save()
        return order
    order = _settle(order, result, approved, context, instrument, created=created)
    if approved.kind != "open":
        mode = context.get("mode", Mode.LIVE)
        from execution.sync import account_sync  # sync imports this module's order helpers

        account_sync(exchange=exchange, mode=mode, run_id=None if mode == Mode.LIVE else context.get("run_id", ""))
    return order


def _order_intent(*, approved: ApprovedOrder, exchange: Exchange, cycle_id: int | None, context: dict[str, Any]) -> tuple[Order, bool]:
    """The Order row (the intent), committed before any exchange call; (row, created).

    What `get_or_create` does, INSERT first: a new order (the usual case) costs
    one statement, and an existing client order id is found by the unique
    constraint and then read.
    """
    fields = dict(
        exchange=exchange.name, cycle_id=cycle_id, mode=context.get("mode", Mode.LIVE), run_id=context.get("run_id", ""),
        inst_id=approved.inst_id, action=approved.action, side=approved.side, pos_side=approved.pos_side,
        order_type=approved.order_type, size=approved.size, price=approved.price, stop_loss=approved.stop_loss,
        take_profit=approved.take_profit, leverage=approved.leverage, reduce_only=approved.reduce_only,
        approved=approved.as_json(), trade_context=_jsonable(context),
    )
    try:
        if connection.in_atomic_block:  # a caller's transaction: a savepoint keeps it usable after a duplicate
            with transaction.atomic():
                return Order.objects.create(client_order_id=approved.client_order_id, **fields), True
        # Autocommit: the INSERT is its own transaction, committed when it returns (no BEGIN/COMMIT round trips).
        return Order.objects.create(client_order_id=approved.client_order_id, **fields), True
    except IntegrityError:
        existing = Order.objects.filter(client_order_id=approved.client_order_id).first()
        if existing is None:  # another constraint failed: not ours to hide
            raise
        return existing, False


def _settle(order: Order, ex: ExchangeOrder, approved: Any, context: dict[str, Any],
            instrument: Instrument | None = None, *, created: bool = False) -> Order:
    """Record what the exchange reports (a short transaction after the call); returns the fresh row.

    `created`: `order` is the row as this call created it (`_order_intent`), see `_settle_unchanged`.
    """
    # Written by one UPDATE, the row in hand is what the locked path leaves: as read, the outcome applied.
    if not (created and _settle_unchanged(order, ex)):
        with transaction.atomic():
            order = Order.objects.select_for_update().get(pk=order.pk)
            _apply_outcome(order, ex, now=timezone.now())
            order.save()
    if approved.kind == "open" and ex.filled_size > 0:
        trade_open_record(order=order, fill=ex, context=context, instrument=instrument)
    return order


def _settle_unchanged(order: Order, ex: ExchangeOrder) -> bool:
    """The outcome written by ONE conditional UPDATE, when the row is still as this call created it.

    The locked read-modify-write in `_settle` costs a savepoint, a locked read and a full-row
    UPDATE. When nobody has touched the row since `_order_intent` created it (same state, same
    `updated_at`: every writer of an Order saves it or sets `updated_at`), the locked read would
    give the row in hand, so the transitions computed from it are the same, and the UPDATE writes
    only what `_apply_outcome` changes. Otherwise (another worker's `account_sync` settled it
    meanwhile, or the transition is refused from this state) nothing is written here: False, and
    the locked path decides from the fresh row as before. `order` is changed in memory either way.
    """
    # The columns `_order_intent` wrote, as a read of the row gives them (the database's decimals):
    # the row in hand then holds what the locked path's read would, without that read.
    row_as_read(order)
    state, stamp = order.state, order.updated_at
    try:
        _apply_outcome(order, ex, now=timezone.now())
    except InvalidTransition:
        return False
    now = timezone.now()
    written = Order.objects.filter(pk=order.pk, state=state, updated_at=stamp).update(
        **{name: getattr(order, name) for name in _OUTCOME_FIELDS}, updated_at=now)
    order.updated_at = now
    return bool(written)


# What `_apply_outcome` changes on an Order (with `transition`: state and history).
_OUTCOME_FIELDS = ("state", "history", "exchange_order_id", "filled_size", "avg_fill_price", "fee")


def _reject(order: Order, exc: ExchangeError) -> None:
    order.refresh_from_db()
    transition(order, OrderState.REJECTED, table=ORDER_TRANSITIONS, now=timezone.now(), note=str(exc))
    order.error_code, order.error_message = exc.code, redact(str(exc))
    order.save()
    event_record(kind="order_rejected", message=f"{order.client_order_id} rejected: {exc}", level=EventLevel.WARNING, cycle_id=order.cycle_id)


def _note(order: Order, message: str) -> None:
    Order.objects.filter(pk=order.pk).update(error_message=redact(message), updated_at=timezone.now())
    order.error_message = redact(message)


def _opt_decimal(value: Any) -> Decimal | None:
    return None if value in (None, "") else Decimal(str(value))


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(data, default=str))


def trade_open_record(*, order: Order, fill: ExchangeOrder, context: dict[str, Any],
                      instrument: Instrument | None = None) -> Trade | None:
    """The journal Trade for an opening fill (an ADD updates the open trade it adds to)."""
    return trade_open_write(order=order, fill=fill, context=context, instrument=instrument)[0]


def trade_open_write(*, order: Order, fill: ExchangeOrder, context: dict[str, Any],
                     instrument: Instrument | None = None) -> tuple[Trade | None, bool]:
    """`trade_open_record` and whether this call wrote a new trade (False: journaled already, here or by
    another writer meanwhile, or an ADD to the open trade)."""
    if instrument is None or instrument.inst_id != order.inst_id:
        instrument = Instrument.objects.filter(inst_id=order.inst_id).first()
    if instrument is None:
        event_record(kind="trade_not_journaled", message=f"{order.inst_id} is not an instrument row; trade not journaled", level=EventLevel.ERROR)
        return None, False
    direction = Direction.LONG if order.pos_side == "long" else Direction.SHORT
    price = fill.avg_px or order.price or Decimal(order.approved.get("entry_reference", "0"))
    mode = context.get("mode", Mode.LIVE)
    # One read for both questions: is this fill journaled already (its client order id), and which
    # open trade does it add to (same instrument, direction and run, so two replays never mix)?
    # Trade's ordering (newest first) makes `existing` what `.first()` gave.
    candidates = list(Trade.objects.filter(
        Q(client_order_id=order.client_order_id)
        | Q(instrument=instrument, direction=direction, status=TradeStatus.OPEN, mode=mode, run_id=context.get("run_id", ""))
    ))
    mine = next((t for t in candidates if t.client_order_id == order.client_order_id), None)
    if mine is not None:
        return mine, False
    existing = candidates[0] if candidates else None
    if existing is not None:
        total = existing.size + fill.filled_size
        existing.entry_price = (existing.entry_price * existing.size + price * fill.filled_size) / total
        existing.size = total
        existing.stop_loss = order.stop_loss or existing.stop_loss
        existing.take_profit = order.take_profit or existing.take_profit
        existing.save()
        return existing, False
    confidence = context.get("confidence_at_entry")
    row = Trade(
        instrument=instrument, cycle_id=order.cycle_id, mode=mode, run_id=context.get("run_id", ""),
        opened_at=fill.ts or timezone.now(), direction=direction, entry_price=price,
        stop_loss=order.stop_loss if order.stop_loss is not None else Decimal(str(order.approved.get("stop_loss") or "0")),
        take_profit=order.take_profit if order.take_profit is not None else _opt_decimal(order.approved.get("take_profit")), size=fill.filled_size, size_pct=to_decimal(context.get("size_pct", order.approved.get("size_pct"))),
        leverage=order.leverage, fees_usd=fill.fee, strategy_used=str(context.get("strategy_used", ""))[:50],
        confidence_at_entry=None if to_decimal(confidence) is None else to_decimal(confidence).quantize(Decimal("0.001")),  # type: ignore[union-attr]
        market_regime=str(context.get("market_regime", ""))[:20], reasoning=str(context.get("reasoning", "")),
        indicators_entry=context.get("indicators_entry"), research_context=context.get("research_context"),
        playbook_version=context.get("playbook_version"), client_order_id=order.client_order_id,
        okx_order_id=order.exchange_order_id, status=TradeStatus.OPEN,
    )
    try:
        if connection.in_atomic_block:  # a caller's transaction: a savepoint keeps it usable after the conflict
            with transaction.atomic():
                row.save(force_insert=True)
        else:
            row.save(force_insert=True)
    except IntegrityError:
        # Another writer (a second account sync, a redelivered EXECUTING) journaled this fill between our
        # read and our INSERT (journal's trade_one_per_opening_order): theirs is the trade.
        existing = Trade.objects.filter(client_order_id=order.client_order_id).first()
        if existing is None:  # another constraint failed: not ours to hide
            raise
        return existing, False
    return row, True


def position_close(*, exchange: Exchange, inst_id: str, pos_side: str, reason: str, cycle_id: int | None = None, mode: str = Mode.LIVE) -> Order | None:
    """Close one position reduce-only at market (flatten, a person's close). None when nothing was open."""
    pos = next((p for p in exchange.positions() if p.inst_id == inst_id and p.pos_side == pos_side), None)
    if pos is None:
        return None
    stamp = exchange.now().isoformat()
    cl_ord_id = "tbx" + hashlib.sha256(f"{inst_id}|{pos_side}|{stamp}|{reason}".encode()).hexdigest()[:29]
    order, created = Order.objects.get_or_create(
        client_order_id=cl_ord_id,
        defaults=dict(exchange=exchange.name, cycle_id=cycle_id, mode=mode, inst_id=inst_id, action="CLOSE",
                      side="sell" if pos_side == "long" else "buy", pos_side=pos_side, order_type="market", size=pos.size,
                      leverage=pos.leverage, reduce_only=True, trade_context={"exit_reason": reason}),
    )
    if not created and order.state in TERMINAL_ORDER_STATES:
        return order
    try:
        result = exchange.close_position(inst_id=inst_id, pos_side=pos_side, client_order_id=cl_ord_id)
    except ExchangeRejected as exc:
        _reject(order, exc)
        return order
    except ExchangeError as exc:
        _note(order, f"close failed: {exc}")
        return order
    order.refresh_from_db()
    if result is None:
        transition(order, OrderState.CANCELED, table=ORDER_TRANSITIONS, now=timezone.now(), note="no position to close")
    else:
        _apply_outcome(order, result, now=timezone.now())
    order.save()
    return order


@dataclass
class FlattenResult:
    orders: list[Order] = field(default_factory=list)
    algo_orders_canceled: int = 0
    errors: list[str] = field(default_factory=list)


def positions_flatten(*, exchange: Exchange, reason: str, mode: str = Mode.LIVE) -> FlattenResult:
    """Close every open position and cancel its TP/SL orders (halt, emergency, a person's order)."""
    result = FlattenResult()
    positions = exchange.positions()
    for inst_id in sorted({p.inst_id for p in positions}):
        try:
            result.algo_orders_canceled += exchange.cancel_algo_orders(inst_id=inst_id)
        except ExchangeError as exc:
            result.errors.append(f"{inst_id}: cancel algo orders failed: {exc}")
    for pos in positions:
        order = position_close(exchange=exchange, inst_id=pos.inst_id, pos_side=pos.pos_side, reason=reason, mode=mode)
        if order is not None:
            result.orders.append(order)
    event_record(kind="positions_flattened", message=f"flattened {len(result.orders)} positions: {reason}",
                 level=EventLevel.WARNING, data={"errors": result.errors})
    from execution.sync import account_sync  # sync imports this module's order helpers

    account_sync(exchange=exchange, mode=mode)
    return result
