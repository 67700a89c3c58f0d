"""What the bot answers to a chat message: who may ask, parsing, the answers.

Plain synchronous code (the PTB handler in `telegram_bot.bot` runs it in a thread):
`command_answer` takes the chat, the user and the text and returns the reply texts
(an empty list: no answer). Only configured chats get answers; admin commands only
from admin chats; any other chat gets nothing and is journaled once per chat and
hour. The controls go through the same services as `manage.py bot` and the admin,
journaled with the chat user as `by`.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone

from journal.models import EventLevel, JournalEvent, LlmCall, Mode, Trade, TradeStatus
from journal.services import event_record
from market.models import Instrument
from telegram_bot.formatting import duration, money, pct, price, size, usd
from tradebot.logging import get_logger, redact

log = get_logger(__name__)
FLATTEN_CONFIRM_SECONDS = 60
CONFIRM_WORD = "YES"
MAX_TRADES = 50
MAX_DAYS = 365
READ_HELP = {
    "status": "/status - state, equity, today's PnL, positions, last cycles, LLM cost",
    "positions": "/positions - open positions",
    "trades": "/trades [n] - the last n trades (default 5)",
    "performance": "/performance [days] - closed trades over the last days (default 7)",
    "playbook": "/playbook - the active playbook and its last change",
    "cost": "/cost [days] - LLM cost (default: today)",
}
ADMIN_HELP = {
    "halt": "/halt [reason] - stop new orders",
    "flatten": "/flatten - halt and close every position (asks to confirm)",
    "resume": "/resume - back to RUNNING",
    "reflect": "/reflect - deep reflection now",
    "cycle": "/cycle INST - run one cycle now, e.g. /cycle BTC-USDT-SWAP",
}


class UsageError(Exception):
    """Malformed arguments: the answer is the command's one-line help."""


@dataclass
class ChatSession:
    """What one bot process remembers between messages: pending /flatten confirmations."""

    flatten_asked: dict[int, datetime] = field(default_factory=dict)


def chat_role(chat_id: int) -> str | None:
    if chat_id in settings.TELEGRAM_ADMIN_CHAT_IDS:
        return "admin"
    if chat_id in settings.TELEGRAM_CHAT_IDS:
        return "reader"
    return None


def who(*, user: str, chat_id: int) -> str:
    return f"telegram:{user or chat_id}"[:100]


def parse(text: str) -> tuple[str, list[str]]:
    """('/trades@MyBot 5' -> ('trades', ['5'])); a text that is not a command gives ('', words)."""
    words = (text or "").strip().split()
    if not words or not words[0].startswith("/"):
        return "", words
    return words[0][1:].split("@", 1)[0].lower(), words[1:]


def command_answer(*, chat_id: int, user: str, text: str, session: ChatSession, now: datetime | None = None,
                   exchange: Any | None = None) -> list[str]:
    """The reply texts for one message (empty: say nothing)."""
    now = now or timezone.now()
    role = chat_role(chat_id)
    name, args = parse(text)
    if role is None:
        unauthorised_record(chat_id=chat_id, user=user, command=name, now=now)
        return []
    if not name:
        asked = session.flatten_asked.pop(chat_id, None)
        if asked is not None and role == "admin" and text.strip().upper() == CONFIRM_WORD:
            if now - asked > timedelta(seconds=FLATTEN_CONFIRM_SECONDS):
                return ["Too late: /flatten again to be asked again. Nothing was done."]
            return [_flatten(by=who(user=user, chat_id=chat_id), exchange=exchange)]
        if asked is not None:
            return ["Not confirmed: nothing was done."]
        return [help_text(role)]
    if name in ("start", "help"):
        return [help_text(role)]
    handler = READ_COMMANDS.get(name) or (ADMIN_COMMANDS.get(name) if role == "admin" else None)
    if handler is None:
        if name in ADMIN_COMMANDS:
            # Not an admin chat: no answer, as for any chat that may not do this.
            unauthorised_record(chat_id=chat_id, user=user, command=name, now=now, kind="telegram_admin_refused")
            return []
        return [f"Unknown command /{name}. Try /help"]
    if name != "flatten":
        session.flatten_asked.pop(chat_id, None)
    ctx = CommandContext(chat_id=chat_id, by=who(user=user, chat_id=chat_id), args=args, now=now, session=session,
                         exchange=exchange)
    try:
        return [handler(ctx)]
    except UsageError:
        return [f"Usage: {(READ_HELP | ADMIN_HELP)[name]}"]
    except Exception as exc:  # noqa: BLE001 - a failing command answers, it does not stop the bot
        message = redact(f"{type(exc).__name__}: {exc}")
        log.error("telegram_command_failed", command=name, chat_id=chat_id, error=message)
        return [f"/{name} failed: {message[:300]}"]


def help_text(role: str) -> str:
    lines = ["Commands:", *READ_HELP.values()]
    if role == "admin":
        lines += ["Admin:", *ADMIN_HELP.values()]
    return "\n".join(lines)


def unauthorised_record(*, chat_id: int, user: str, command: str, now: datetime, level: str = EventLevel.WARNING,
                        kind: str = "telegram_unauthorised") -> bool:
    """Journal a message from a chat that may not do this, at most once per chat and hour."""
    recent = JournalEvent.objects.filter(kind=kind, created_at__gte=now - timedelta(hours=1))
    if any((e or {}).get("chat_id") == chat_id for e in recent.values_list("data", flat=True)):
        return False
    event_record(kind=kind, level=level, data={"chat_id": chat_id, "user": user[:100], "command": command[:40]},
                 message=f"Telegram chat {chat_id} ({user or '?'}) may not use {('/' + command) if command else 'the bot'}: "
                         "no answer given")
    return True


# --- the commands -------------------------------------------------------------------------
@dataclass
class CommandContext:
    chat_id: int
    by: str
    args: list[str]
    now: datetime
    session: ChatSession
    exchange: Any | None = None


def _int_arg(ctx: CommandContext, default: int, maximum: int) -> int:
    if not ctx.args:
        return default
    if len(ctx.args) > 1 or not re.fullmatch(r"\d{1,6}", ctx.args[0]) or not 1 <= int(ctx.args[0]) <= maximum:
        raise UsageError
    return int(ctx.args[0])


def _instruments() -> dict[str, Instrument]:
    return {i.inst_id: i for i in Instrument.objects.all()}


def cmd_status(ctx: CommandContext) -> str:
    from tradebot.controls import bot_status

    r = bot_status(exchange=ctx.exchange)
    insts = _instruments()
    lines = [f"State {r.state}" + (f" since {r.since:%m-%d %H:%M} UTC" if r.since else "")]
    if r.state != "RUNNING" and r.reason:
        lines.append(f"  {r.reason[:120]}")
    lines.append(f"Equity {money(r.equity) if r.equity is not None else '?'}")
    lines.append(f"Today PnL {money(r.today_pnl)}")
    lines.append(f"LLM today {usd(r.llm_cost_today, '0.0001')}  brain {r.brain}")
    lines.append(f"Positions {len(r.positions)}")
    for p in r.positions:
        inst = insts.get(p["inst_id"])
        lines.append(f"  {p['inst_id']} {p['side']} {size(p['size'], inst)} @ {price(p['entry'], inst)} uPnL {money(p['upl'], inst)}")
    lines.append("Last cycles")
    for c in r.last_cycles:
        if c["cycle"] is None:
            lines.append(f"  {c['inst_id']}: none yet")
        else:
            at = datetime.fromisoformat(c["as_of"])
            lines.append(f"  {c['inst_id']} #{c['cycle']} {at:%H:%M} {c['state']}/{c['outcome']}")
    lines += [f"! {redact(e)[:200]}" for e in r.errors]
    return "\n".join(lines)


def cmd_positions(ctx: CommandContext) -> str:
    from execution.exchanges import exchange_from_settings
    from execution.selectors import positions_open

    positions = positions_open(exchange=ctx.exchange or exchange_from_settings())
    if not positions:
        return "No open positions."
    insts = _instruments()
    out = []
    for p in positions:
        inst = insts.get(p.inst_id)
        out.append(f"{p.inst_id} {p.pos_side} {size(p.size, inst)} @ {price(p.avg_px, inst)}\n"
                   f"  uPnL {money(p.unrealized_pnl, inst)}  SL {price(p.stop_loss, inst)}  TP {price(p.take_profit, inst)}")
    return "\n".join(out)


def cmd_trades(ctx: CommandContext) -> str:
    n = _int_arg(ctx, 5, MAX_TRADES)
    trades = list(Trade.objects.filter(mode=Mode.LIVE).select_related("instrument").order_by("-opened_at", "-id")[:n])
    if not trades:
        return "No trades yet."
    out = []
    for t in trades:
        inst = t.instrument
        head = f"#{t.pk} {inst.inst_id} {t.direction.lower()} {size(t.size, inst)} @ {price(t.entry_price, inst)}"
        if t.status == TradeStatus.CLOSED:
            out.append(f"{head}\n  closed {price(t.exit_price, inst)} {t.exit_reason}: {money(t.pnl_usd, inst)} "
                       f"({pct(t.pnl_pct)}) in {duration(t.duration_seconds)}")
        else:
            out.append(f"{head}\n  {t.status} since {t.opened_at:%m-%d %H:%M}")
    return "\n".join(out)


def cmd_performance(ctx: CommandContext) -> str:
    from brain.performance import performance_summarize, trade_record_from_row

    days = _int_arg(ctx, 7, MAX_DAYS)
    rows = Trade.objects.filter(mode=Mode.LIVE, run_id="", status=TradeStatus.CLOSED, pnl_usd__isnull=False,
                                closed_at__gte=ctx.now - timedelta(days=days)).select_related("instrument")
    s = performance_summarize([trade_record_from_row(t) for t in rows])
    if not s.total_trades:
        return f"No closed trades in the last {days} day(s)."
    pf = "n/a" if s.profit_factor is None else f"{s.profit_factor.quantize(Decimal('0.01'))}"
    return "\n".join([
        f"Last {days} day(s): {s.total_trades} trades, {s.wins} won, {s.losses} lost",
        f"Win rate {pct(s.win_rate)}  PF {pf}",
        f"PnL {money(s.total_pnl)}  fees {money(s.total_fees)}",
        f"Max drawdown {money(s.max_drawdown_usd)}  worst streak {s.max_consecutive_losses} losses",
    ])


def cmd_playbook(ctx: CommandContext) -> str:
    from brain.models import PlaybookStatus, PlaybookVersion
    from brain.playbook import playbook_current

    current = playbook_current()
    lines = [f"Playbook v{current.version} active since {current.created_at:%Y-%m-%d %H:%M} ({current.triggered_by})"]
    lines.append(f"Last change: {current.change_summary[:500] or 'none recorded'}")
    # The bot's own versions (a replay --learn run's are that run's).
    latest = (PlaybookVersion.objects.exclude(pk=current.pk).filter(version__gt=current.version, run_id="")
              .order_by("-version").first())
    if latest is not None:
        state = "waiting for validation" if latest.status == PlaybookStatus.CANDIDATE else latest.status
        reason = ((latest.validation or {}).get("reason") or "")[:300]
        lines.append(f"Newer v{latest.version}: {state}" + (f" - {reason}" if reason else ""))
    return "\n".join(lines)


def cmd_cost(ctx: CommandContext) -> str:
    days = _int_arg(ctx, 1, MAX_DAYS)
    midnight = ctx.now.replace(hour=0, minute=0, second=0, microsecond=0)
    since = midnight - timedelta(days=days - 1)
    rows = (LlmCall.objects.filter(created_at__gte=since).values("purpose")
            .annotate(cost=Sum("cost_usd"), calls=Count("id")).order_by("-cost"))
    total = sum((r["cost"] or Decimal(0) for r in rows), Decimal(0))
    label = "today" if days == 1 else f"last {days} days"
    lines = [f"LLM cost {label}: {usd(total, '0.0001')} (budget {usd(settings.LLM_DAILY_BUDGET_USD)}/day)"]
    lines += [f"  {r['purpose']}: {usd(r['cost'] or 0, '0.0001')} in {r['calls']} call(s)" for r in rows]
    return "\n".join(lines)


def cmd_halt(ctx: CommandContext) -> str:
    from tradebot.controls import bot_halt_and_flatten

    reason = " ".join(ctx.args).strip()[:300] or "halted from Telegram"
    result = bot_halt_and_flatten(reason=reason, by=ctx.by, flatten=False)
    return f"Bot {result['state']}: {result['reason']}\nNo new orders. /resume to continue."


def cmd_flatten(ctx: CommandContext) -> str:
    if ctx.args:
        raise UsageError
    ctx.session.flatten_asked[ctx.chat_id] = ctx.now
    return (f"This halts the bot and closes EVERY position at market.\nReply {CONFIRM_WORD} within "
            f"{FLATTEN_CONFIRM_SECONDS} s to confirm; anything else cancels.")


def _flatten(*, by: str, exchange: Any | None) -> str:
    from tradebot.controls import bot_halt_and_flatten

    result = bot_halt_and_flatten(reason="flatten", by=by, flatten=True, exchange=exchange)
    flat = result.get("flatten")
    orders = getattr(flat, "orders", None)
    return f"Bot {result['state']}. Flattened: {len(orders) if orders is not None else '?'} close order(s) sent."


def cmd_resume(ctx: CommandContext) -> str:
    from execution.bot import bot_resume

    if ctx.args:
        raise UsageError
    view = bot_resume(by=ctx.by)
    return f"Bot {view.state}."


def cmd_reflect(ctx: CommandContext) -> str:
    from telegram_bot.tasks import reflect_now

    if ctx.args:
        raise UsageError
    reflect_now.apply_async(kwargs={"requested_by": ctx.by}, queue="reflection")
    event_record(kind="telegram_reflect_requested", message=f"deep reflection requested by {ctx.by}")
    return "Deep reflection queued. The result comes as an alert (playbook promoted or refused)."


def cmd_cycle(ctx: CommandContext) -> str:
    from journal.models import CycleState
    from tradebot.cycle import cycle_open
    from tradebot.pipeline import pipeline_chain

    if len(ctx.args) != 1:
        raise UsageError
    inst_id = ctx.args[0].upper()
    instrument = Instrument.objects.filter(inst_id=inst_id).first()
    if instrument is None:
        known = ", ".join(Instrument.objects.filter(trading_enabled=True).values_list("inst_id", flat=True)) or "none"
        return f"Unknown instrument {inst_id[:40]}. Trading: {known}. Usage: {ADMIN_HELP['cycle']}"
    cycle = cycle_open(instrument=instrument, as_of=timezone.now(), trigger="manual")
    if cycle.state == CycleState.SKIPPED:
        return f"Not started: {cycle.reason[:200]}"
    pipeline_chain(cycle.pk).apply_async()
    event_record(kind="telegram_cycle_requested", message=f"cycle {cycle.pk} for {inst_id} requested by {ctx.by}",
                 instrument_id=instrument.pk, cycle_id=cycle.pk)
    return f"Cycle #{cycle.pk} for {inst_id} sent to the workers."


READ_COMMANDS: dict[str, Callable[[CommandContext], str]] = {
    "status": cmd_status, "positions": cmd_positions, "trades": cmd_trades, "performance": cmd_performance,
    "playbook": cmd_playbook, "cost": cmd_cost,
}
ADMIN_COMMANDS: dict[str, Callable[[CommandContext], str]] = {
    "halt": cmd_halt, "flatten": cmd_flatten, "resume": cmd_resume, "reflect": cmd_reflect, "cycle": cmd_cycle,
}
