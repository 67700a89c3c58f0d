"""The bot's state: halt, resume, cooldown, the day's start equity, the peak (one row per scope, locked while
changed). The risk gate reads these through `execution.selectors.bot_state_view`; only these services write them."""
from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from execution.models import (
    BOT_TRANSITIONS,
    DEMO_SCOPE,
    BotState,
    LIVE_SCOPE,
    BotStatus,
    LiveTradingConfirmation,
    transition,
)
from execution.risk import BotStateView
from execution.selectors import bot_state, bot_state_view
from journal.models import EventLevel, Mode
from journal.services import event_record

SYSTEM = "system"


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
