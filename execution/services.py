"""Execution services: the bot's state, the risk gate's bookkeeping, orders and account sync.

Rules kept here: the Order row with its client order id is written (and committed) before
any exchange call and its outcome after; no transaction spans an exchange call; a placement
whose outcome is unknown stays PENDING and is looked up by client order id before anything
else is done with it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, Exists, F, OuterRef, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from brain.schemas import Action, Decision
from execution.exchanges.base import (
    AccountState,
    ClosedPosition,
    Exchange,
    ExchangeError,
    ExchangeOrder,
    ExchangeRejected,
    ExchangeUnknownOutcome,
    ExchangeUnreachable,
    Position,
)
from execution.models import (
    BOT_TRANSITIONS,
    DEMO_SCOPE,
    ORDER_TRANSITIONS,
    TERMINAL_ORDER_STATES,
    BotState,
    InvalidTransition,
    LIVE_SCOPE,
    BotStatus,
    LiveTradingConfirmation,
    Order,
    OrderState,
    row_as_read,
    transition,
)
from execution.outages import exchange_outage_end, exchange_unreachable_record
from execution.risk import ApprovedOrder, BotStateView, MarketRef, RiskVerdict, approval_is_genuine, risk_check
from execution.selectors import bot_scope, bot_state, bot_state_view
from execution.validation import to_decimal
from journal.models import Cycle, Direction, EventLevel, Mode, RiskRejection, Trade, TradeStatus
from journal.services import event_record
from market.models import Instrument
import structlog
from redaction import redact

log = structlog.get_logger(__name__)
SYSTEM = "system"
EXCHANGE_STATES = {
    "live": OrderState.SUBMITTED, "partially_filled": OrderState.PARTIALLY_FILLED, "filled": OrderState.FILLED,
    "canceled": OrderState.CANCELED, "mmp_canceled": OrderState.CANCELED, "rejected": OrderState.REJECTED,
}


# --- Bot state ----------------------------------------------------------------------
def _locked_bot(scope: str) -> BotState:
    row = BotState.objects.select_for_update().filter(scope=scope).first()
    if row is None:  # the first use of this scope: create the row, then lock it
        BotState.objects.get_or_create(scope=scope)
        row = BotState.objects.select_for_update().get(scope=scope)
    return row


def _set_state(row: BotState, to: str, *, reason: str, by: str, now: datetime, until: datetime | None = None) -> None:
    transition(row, to, table=BOT_TRANSITIONS, now=now)
    row.reason, row.by, row.since, row.until = reason, by, now, until
    row.save()
    event_record(kind=f"bot_{to.lower()}", message=f"bot {to}: {reason} (by {by})",
                 level=EventLevel.WARNING if to != BotStatus.RUNNING else EventLevel.INFO,
                 mode=Mode.LIVE if row.scope == LIVE_SCOPE else Mode.DEMO if row.scope == DEMO_SCOPE else Mode.REPLAY)


def next_utc_midnight(now: datetime) -> datetime:
    return (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)


def bot_halt(*, reason: str, by: str, emergency: bool = False, now: datetime | None = None, scope: str = LIVE_SCOPE) -> BotStateView:
    """HALTED (lifts itself at the next UTC day when by the system) or EMERGENCY_HALT (a person must resume)."""
    now = now or timezone.now()
    with transaction.atomic():
        row = _locked_bot(scope)
        if row.state == BotStatus.EMERGENCY_HALT:
            return bot_state(scope=scope)
        to = BotStatus.EMERGENCY_HALT if emergency else BotStatus.HALTED
        until = None if emergency or by != SYSTEM else next_utc_midnight(now)
        _set_state(row, to, reason=reason, by=by, now=now, until=until)
    return bot_state(scope=scope)


def bot_resume(*, by: str, now: datetime | None = None, scope: str = LIVE_SCOPE) -> BotStateView:
    """A person resumes the bot. After an emergency halt the peak equity restarts from the current equity."""
    if not by.strip() or by == SYSTEM:
        raise ValueError("bot_resume needs the name of the person resuming the bot")
    now = now or timezone.now()
    with transaction.atomic():
        row = _locked_bot(scope)
        if row.state == BotStatus.RUNNING:
            return bot_state(scope=scope)
        if row.state == BotStatus.EMERGENCY_HALT:
            row.peak_equity = None  # otherwise the same drawdown halts it again at once
        row.consecutive_losses = 0
        _set_state(row, BotStatus.RUNNING, reason=f"resumed by {by}", by=by, now=now)
    return bot_state(scope=scope)


def _refresh_due(view: BotStateView, now: datetime) -> bool:
    return view.state in (BotStatus.HALTED, BotStatus.COOLDOWN) and view.until is not None and view.until <= now


def bot_state_refresh(*, now: datetime | None = None, scope: str = LIVE_SCOPE, current: BotStateView | None = None) -> BotStateView:
    """Lift HALTED/COOLDOWN whose time is up; EMERGENCY_HALT stays until a person resumes.

    `current`: the state the caller has just read. The row is locked and
    changed only when a lift is due (re-checked under the lock); otherwise
    the state read is the answer, without a transaction.
    """
    now = now or timezone.now()
    view = current if current is not None else bot_state(scope=scope)
    if not _refresh_due(view, now):
        return view
    with transaction.atomic():
        row = _locked_bot(scope)
        if row.state in (BotStatus.HALTED, BotStatus.COOLDOWN) and row.until is not None and row.until <= now:
            was = row.state
            if was == BotStatus.COOLDOWN:
                row.consecutive_losses = 0
            _set_state(row, BotStatus.RUNNING, reason=f"{was} ended at {row.until.isoformat()}", by=SYSTEM, now=now)
    return bot_state(scope=scope)


def bot_peak_raise(*, equity: Decimal, scope: str = LIVE_SCOPE) -> bool:
    """Raise the bot state's peak equity to `equity` if it is higher: one conditional UPDATE.

    What `account_sync` does to the peak, for a caller that knows nothing else changed
    (the replay between closes: its orders settle inside `order_place`).
    """
    return bool(BotState.objects.filter(scope=scope).filter(Q(peak_equity__isnull=True) | Q(peak_equity__lt=equity))
                .update(peak_equity=equity))


def risk_daily_reset(*, now: datetime, equity: Decimal, scope: str = LIVE_SCOPE) -> BotStateView:
    """00:00 UTC: the day's starting equity; a daily-loss halt ends. Idempotent per UTC date.

    One UPDATE whose conditions the database evaluates on the row as it is (as `_bot_figures_sync`
    does), instead of a locked read-modify-write.
    """
    day = now.date()
    _bot_update(scope,
                day_start_equity=Case(When(day_start_date=day, then=F("day_start_equity")), default=Value(equity)),
                day_start_date=Value(day),
                peak_equity=Case(When(Q(peak_equity__isnull=True) | Q(peak_equity__lt=equity), then=Value(equity)),
                                 default=F("peak_equity")))
    return bot_state_refresh(now=now, scope=scope)


def risk_trade_closed(*, pnl: Decimal, now: datetime, scope: str = LIVE_SCOPE) -> BotStateView:
    """Count consecutive losses; at the limit the bot cools down for COOLDOWN_AFTER_LOSS_STREAK seconds.

    The count moves in one UPDATE (two closes at once each count) and the row is read once; only
    a count at the limit takes the lock, deciding again on the row as locked.
    """
    _bot_update(scope, consecutive_losses=F("consecutive_losses") + 1 if pnl < 0 else Value(0))
    view = bot_state(scope=scope)
    if not _cooldown_due(view):
        return view
    with transaction.atomic():
        row = _locked_bot(scope)
        view = bot_state_view(row)
        if _cooldown_due(view):
            until = now + timedelta(seconds=settings.COOLDOWN_AFTER_LOSS_STREAK)
            _set_state(row, BotStatus.COOLDOWN, reason=f"{row.consecutive_losses} consecutive losses", by=SYSTEM, now=now, until=until)
            view = bot_state_view(row)
    return view


def _cooldown_due(view: BotStateView) -> bool:
    return view.consecutive_losses >= settings.MAX_CONSECUTIVE_LOSSES and view.state in (BotStatus.RUNNING, BotStatus.COOLDOWN)


def _bot_update(scope: str, **values: Any) -> None:
    """One UPDATE of the scope's bot state row; its first use makes the row first."""
    if not BotState.objects.filter(scope=scope).update(**values, updated_at=timezone.now()):
        BotState.objects.get_or_create(scope=scope)
        BotState.objects.filter(scope=scope).update(**values, updated_at=timezone.now())


def live_trading_confirm(*, by: str, note: str = "") -> LiveTradingConfirmation:
    """A person confirms real-money trading (needs OKX_LIVE_TRADING=true as well)."""
    if not by.strip() or by == SYSTEM:
        raise ValueError("live trading must be confirmed by a named person")
    row = LiveTradingConfirmation.objects.create(by=by.strip(), confirmed_at=timezone.now(), note=note)
    event_record(kind="live_trading_confirmed", message=f"live trading confirmed by {row.by}", level=EventLevel.WARNING)
    return row


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
    if instrument is None or instrument.inst_id != order.inst_id:
        instrument = Instrument.objects.filter(inst_id=order.inst_id).first()
    if instrument is None:
        event_record(kind="trade_not_journaled", message=f"{order.inst_id} is not an instrument row; trade not journaled", level=EventLevel.ERROR)
        return None
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
        return mine
    existing = candidates[0] if candidates else None
    if existing is not None:
        total = existing.size + fill.filled_size
        existing.entry_price = (existing.entry_price * existing.size + price * fill.filled_size) / total
        existing.size = total
        existing.stop_loss = order.stop_loss or existing.stop_loss
        existing.take_profit = order.take_profit or existing.take_profit
        existing.save()
        return existing
    confidence = context.get("confidence_at_entry")
    return Trade.objects.create(
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
    account_sync(exchange=exchange, mode=mode)
    return result


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
    trade = trade_open_record(order=order, fill=fill, context=dict(order.trade_context))
    if trade is not None:
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
