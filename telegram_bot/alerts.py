"""Alerts from what the bot already journals: scan, severity, cooldown merging, silent hours, dispatch.

Nothing below the interface layer knows Telegram exists: `alerts_scan` reads the rows
market/journal/brain/execution write (filled orders, closed trades, journal events,
failed cycles), from a stored cursor minus a look-back (a row committed late is still
seen; its `AlertKey` makes a second look harmless), and turns each into an alert line.

Severity: CRITICAL goes at once, always. INFO and WARN wait through silent hours. Per
alert type, a repeat within TELEGRAM_COOLDOWN_SECONDS of the last message of that type
waits for the cooldown's end, and every further repeat merges into that waiting alert:
one message "3x ...".
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from execution.models import Order, OrderState
from journal.models import Cycle, CycleState, EventLevel, JournalEvent, Mode, Trade, TradeStatus
from market.models import Instrument
from telegram_bot.formatting import duration, money, pct, price, size
from telegram_bot.models import Alert, AlertDelivery, AlertKey, AlertStatus, ScanCursor, Severity
from tradebot.logging import get_logger, redact

log = get_logger(__name__)
LOOKBACK = timedelta(minutes=2)
FEE_PLACES = Decimal("0.0001")
MAX_LINES_SHOWN = 10  # a merged alert shows this many of its lines, then "... and N more"

# Journal event kind -> (alert type, severity, title). Kinds not listed do not alert.
EVENT_ALERTS: dict[str, tuple[str, str, str]] = {
    "bot_halted": ("bot_halted", Severity.CRITICAL, "HALTED"),
    "bot_emergency_halt": ("bot_emergency_halt", Severity.CRITICAL, "EMERGENCY HALT"),
    "bot_cooldown": ("bot_cooldown", Severity.WARN, "COOLDOWN"),
    "bot_running": ("bot_resumed", Severity.INFO, "RESUMED"),
    "llm_budget_warning": ("llm_budget", Severity.WARN, "LLM budget"),
    "llm_degrade_mode": ("llm_degrade", Severity.WARN, "LLM degrade mode"),
    "llm_degrade_mode_ended": ("llm_degrade_ended", Severity.INFO, "LLM back"),
    "order_failed": ("exchange_error", Severity.CRITICAL, "Exchange error"),
    "order_unknown_outcome": ("exchange_error", Severity.CRITICAL, "Exchange: order outcome unknown"),
    "positions_flattened": ("flattened", Severity.WARN, "FLATTENED"),
    "playbook_promoted": ("playbook_promoted", Severity.INFO, "Playbook promoted"),
    "playbook_rejected": ("playbook_refused", Severity.WARN, "Playbook refused"),
    "live_trading_confirmed": ("live_trading", Severity.CRITICAL, "LIVE TRADING"),
    # execution.outages: one event when an outage begins (merged with the failed cycles' lines below) and one when
    # the exchange answers again with every open position's exchange-side stops checked (CRITICAL when one lacks them).
    "exchange_unreachable": ("exchange_unreachable", Severity.WARN, "Exchange unreachable"),
    "exchange_reachable": ("exchange_reachable", Severity.INFO, "Exchange answers again"),
}
# A failed cycle whose error says the far end did not answer: the exchange (or market data) is unreachable.
UNREACHABLE_MARKERS = ("unreachable", "connect", "timeout", "timed out", "feederror", "exchangeerror", "network",
                       "temporar", "unavailable")


@dataclass(frozen=True)
class AlertLine:
    key: str
    alert_type: str
    severity: str
    text: str


# --- silent hours -------------------------------------------------------------------------
def silent_window(spec: str | None = None) -> tuple[int, int] | None:
    spec = settings.TELEGRAM_SILENT_HOURS if spec is None else spec
    if not spec:
        return None
    start, end = (int(h) for h in spec.split("-"))
    return None if start == end else (start, end)


def silent_until(now: datetime, spec: str | None = None) -> datetime | None:
    """The end of the silent window `now` is in (UTC), or None outside it."""
    window = silent_window(spec)
    if window is None:
        return None
    start, end = window
    now = now.astimezone(UTC)
    hour = now.hour
    inside = start <= hour < end if start < end else (hour >= start or hour < end)
    if not inside:
        return None
    until = now.replace(hour=end, minute=0, second=0, microsecond=0)
    return until if until > now else until + timedelta(days=1)


# --- enqueue ------------------------------------------------------------------------------
def alert_enqueue(*, line: AlertLine, now: datetime | None = None) -> Alert | None:
    """Make `line` part of an alert once (None when its key was seen before)."""
    now = now or timezone.now()
    with transaction.atomic():
        if AlertKey.objects.filter(key=line.key).exists():
            return None
        alert = _alert_for(line, now)
        try:
            with transaction.atomic():
                AlertKey.objects.create(key=line.key, alert=alert)
        except IntegrityError:  # another scan took it meanwhile: undo this one's part
            transaction.set_rollback(True)
            return None
    return alert


def _alert_for(line: AlertLine, now: datetime) -> Alert:
    if line.severity == Severity.CRITICAL:
        return Alert.objects.create(alert_type=line.alert_type, severity=line.severity, lines=[line.text], send_after=now)
    pending = (Alert.objects.select_for_update().filter(alert_type=line.alert_type, status=AlertStatus.PENDING)
               .order_by("-id").first())
    if pending is not None:  # a repeat while one waits: merge
        pending.lines = [*pending.lines, line.text]
        pending.save(update_fields=["lines"])
        return pending
    send_after, held = now, ""
    last = (Alert.objects.filter(alert_type=line.alert_type, status=AlertStatus.DISPATCHED)
            .order_by("-dispatched_at").values_list("dispatched_at", flat=True).first())
    cooldown = timedelta(seconds=settings.TELEGRAM_COOLDOWN_SECONDS)
    if last is not None and last + cooldown > now:
        send_after, held = last + cooldown, "cooldown"
    quiet = silent_until(send_after)
    if quiet is not None:
        send_after, held = quiet, "silent_hours"
    return Alert.objects.create(alert_type=line.alert_type, severity=line.severity, lines=[line.text],
                                send_after=send_after, held_reason=held)


# --- dispatch -----------------------------------------------------------------------------
def alert_chats() -> list[int]:
    """Every chat that gets alerts: the allowed chats and the admin chats, each once."""
    return list(dict.fromkeys([*settings.TELEGRAM_CHAT_IDS, *settings.TELEGRAM_ADMIN_CHAT_IDS]))


def alert_text(alert: Alert) -> str:
    lines = list(alert.lines)
    if len(lines) == 1:
        return f"{_tag(alert.severity)}{lines[0]}"
    shown = lines[-MAX_LINES_SHOWN:]
    head = f"{_tag(alert.severity)}{len(lines)}x {alert.alert_type.replace('_', ' ')}"
    if alert.held_reason:
        head += f" (held: {alert.held_reason.replace('_', ' ')})"
    more = [f"... and {len(lines) - len(shown)} earlier"] if len(lines) > len(shown) else []
    return "\n\n".join([head, *more, *shown])


def _tag(severity: str) -> str:
    return {"CRITICAL": "[CRITICAL] ", "WARN": "[WARN] "}.get(severity, "")


def alerts_dispatch_due(*, now: datetime | None = None) -> list[Alert]:
    """Freeze every due PENDING alert and queue one delivery per chat (a conditional UPDATE claims each)."""
    now = now or timezone.now()
    chats = alert_chats()
    done: list[Alert] = []
    for alert_id in Alert.objects.filter(status=AlertStatus.PENDING, send_after__lte=now).order_by("id").values_list("id", flat=True):
        with transaction.atomic():
            if not Alert.objects.filter(pk=alert_id, status=AlertStatus.PENDING).update(
                    status=AlertStatus.DISPATCHED, dispatched_at=now):
                continue
            alert = Alert.objects.get(pk=alert_id)
            alert.text = alert_text(alert)
            alert.save(update_fields=["text"])
            AlertDelivery.objects.bulk_create([AlertDelivery(alert=alert, chat_id=c, next_attempt_at=now) for c in chats])
        done.append(alert)
    return done


# --- scan ---------------------------------------------------------------------------------
def alerts_scan(*, now: datetime | None = None) -> int:
    """Alert lines for every new source row since the cursor; returns how many became alerts."""
    now = now or timezone.now()
    cursor, _ = ScanCursor.objects.get_or_create(source="live", defaults={"scanned_to": now})
    since = cursor.scanned_to - LOOKBACK
    created = 0
    for line in [*_order_lines(since), *_trade_lines(since), *_event_lines(since), *_cycle_lines(since)]:
        if alert_enqueue(line=line, now=now) is not None:
            created += 1
    ScanCursor.objects.filter(pk=cursor.pk, scanned_to__lt=now).update(scanned_to=now)
    return created


def _instruments() -> dict[str, Instrument]:
    return {i.inst_id: i for i in Instrument.objects.all()}


def _order_lines(since: datetime) -> list[AlertLine]:
    insts = _instruments()
    lines = []
    for o in Order.objects.filter(mode=Mode.LIVE, state=OrderState.FILLED, updated_at__gte=since).order_by("updated_at", "id"):
        inst = insts.get(o.inst_id)
        what = {"open": "open", "add": "add", "close": "close", "reduce": "reduce"}.get(str(o.approved.get("kind", "")), o.action)
        text = (f"FILLED {o.inst_id}\n{what} {o.pos_side} {size(o.filled_size, inst)} @ {price(o.avg_fill_price, inst)}"
                + (f"\nSL {price(o.stop_loss, inst)}" if o.stop_loss else "")
                + (f"  TP {price(o.take_profit, inst)}" if o.take_profit else "")
                + f"\nfee {money(o.fee, inst, places=FEE_PLACES)}")
        lines.append(AlertLine(key=f"order:{o.client_order_id}", alert_type="order_filled", severity=Severity.INFO, text=text))
    return lines


EXIT_TYPES = {
    "stop_loss": ("sl_hit", Severity.WARN, "STOP LOSS hit"),
    "take_profit": ("tp_hit", Severity.INFO, "TAKE PROFIT hit"),
    "liquidation": ("liquidated", Severity.CRITICAL, "LIQUIDATED"),
}


def _trade_lines(since: datetime) -> list[AlertLine]:
    lines = []
    for t in (Trade.objects.select_related("instrument")
              .filter(mode=Mode.LIVE, status=TradeStatus.CLOSED, updated_at__gte=since).order_by("closed_at", "id")):
        inst = t.instrument
        alert_type, severity, title = EXIT_TYPES.get(t.exit_reason, ("trade_closed", Severity.INFO, "CLOSED"))
        text = (f"{title} {inst.inst_id} {t.direction.lower()}\n"
                f"PnL {money(t.pnl_usd, inst)} ({pct(t.pnl_pct)})\n"
                f"entry {price(t.entry_price, inst)}  exit {price(t.exit_price, inst)}\n"
                f"reason {t.exit_reason or '?'}  held {duration(t.duration_seconds)}")
        lines.append(AlertLine(key=f"trade_closed:{t.pk}", alert_type=alert_type, severity=severity, text=text))
    return lines


def _event_lines(since: datetime) -> list[AlertLine]:
    lines = []
    kinds = [*EVENT_ALERTS, "cycle_failed", "account_sync_failed"]
    for e in JournalEvent.objects.filter(mode=Mode.LIVE, kind__in=kinds, created_at__gte=since).order_by("created_at", "id"):
        message = redact(e.message)
        if e.kind in ("cycle_failed", "account_sync_failed"):
            # A cycle or an account sync (every ~15 s, even with no cycle running) that failed because the far end
            # did not answer: the exchange (or market data) is unreachable. Repeats merge under the cooldown.
            lowered = message.lower()
            if not any(m in lowered for m in UNREACHABLE_MARKERS) or "database unavailable" in lowered:
                continue  # other failures: the repeated-failure alert below (cycles) or the journal (syncs)
            lines.append(AlertLine(key=f"event:{e.pk}", alert_type="exchange_unreachable", severity=Severity.WARN,
                                   text=f"Exchange/market data unreachable\n{_short(message)}"))
            continue
        alert_type, severity, title = EVENT_ALERTS[e.kind]
        if e.kind == "exchange_reachable" and e.level == EventLevel.ERROR:
            severity, title = Severity.CRITICAL, "Exchange answers again: a position lacks its exchange-side stop"
        lines.append(AlertLine(key=f"event:{e.pk}", alert_type=alert_type, severity=severity, text=f"{title}\n{_short(message)}"))
    return lines


def _cycle_lines(since: datetime) -> list[AlertLine]:
    """One CRITICAL alert per streak of TELEGRAM_FAILING_CYCLES failed cycles in a row for an instrument."""
    n = settings.TELEGRAM_FAILING_CYCLES
    lines = []
    recent = set(Cycle.objects.filter(mode=Mode.LIVE, state=CycleState.FAILED, ended_at__gte=since)
                 .values_list("instrument_id", flat=True))
    for inst_id in recent:
        last = list(Cycle.objects.filter(mode=Mode.LIVE, instrument_id=inst_id).exclude(state=CycleState.SKIPPED)
                    .order_by("-id").select_related("instrument")[:n])
        if len(last) < n or any(c.state != CycleState.FAILED for c in last):
            continue
        # The streak is named by its first failed cycle: a longer streak does not alert again.
        first = _streak_start(inst_id, last[-1].pk)
        text = (f"{n} cycles in a row FAILED for {last[0].instrument.inst_id}\n"
                f"last: #{last[0].pk} {_short(redact(last[0].reason or last[0].error))}")
        lines.append(AlertLine(key=f"cycles_failing:{inst_id}:{first}", alert_type="cycles_failing",
                               severity=Severity.CRITICAL, text=text))
    return lines


def _streak_start(inst_id: int, oldest_failed_id: int) -> int:
    before = (Cycle.objects.filter(mode=Mode.LIVE, instrument_id=inst_id, id__lt=oldest_failed_id)
              .exclude(state=CycleState.FAILED).exclude(state=CycleState.SKIPPED).order_by("-id").values_list("id", flat=True).first())
    qs = Cycle.objects.filter(mode=Mode.LIVE, instrument_id=inst_id, state=CycleState.FAILED)
    if before is not None:
        qs = qs.filter(id__gt=before)
    return qs.order_by("id").values_list("id", flat=True).first() or oldest_failed_id


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def alerts_summary() -> dict[str, Any]:
    """Counts for /status and the logs."""
    return {
        "pending": Alert.objects.filter(status=AlertStatus.PENDING).count(),
        "queued": AlertDelivery.objects.filter(status__in=["queued", "sending"]).count(),
        "failed": AlertDelivery.objects.filter(status="failed").count(),
    }
