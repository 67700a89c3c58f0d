"""Bot controls shared by `manage.py bot` and the admin actions: halt, resume, flatten, status."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from journal.models import Cycle, LlmCall, Mode, Trade, TradeStatus
from market.models import Instrument
from tradebot.celery import QUEUES, app
from tradebot.logging import get_logger

log = get_logger(__name__)


def bot_halt_and_flatten(*, reason: str, by: str, flatten: bool, exchange: Any | None = None) -> dict[str, Any]:
    """Halt new orders; with `flatten`, also close every position and cancel algo orders."""
    from execution.bot import bot_halt

    view = bot_halt(reason=reason, by=by)
    result: dict[str, Any] = {"state": str(view.state), "reason": view.reason}
    if flatten:
        from execution.exchanges import exchange_from_settings
        from execution.services import positions_flatten
        from tradebot.reflection import trade_reviews_request

        result["flatten"] = positions_flatten(exchange=exchange or exchange_from_settings(), reason=reason)
        # The flatten's account sync closed the trades; execution cannot queue their reviews, this layer does.
        result["reviews_queued"] = trade_reviews_request(mode=Mode.LIVE, requested_by="flatten")
    return result


def queue_depths() -> dict[str, int | None]:
    """Messages waiting per queue on the broker (None when the broker cannot be asked)."""
    depths: dict[str, int | None] = {}
    try:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            for queue in QUEUES:
                try:
                    depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                except Exception:  # noqa: BLE001 - an undeclared queue has nothing waiting
                    depths[queue] = 0
    except Exception as exc:  # noqa: BLE001 - status must print even with the broker down
        log.warning("queue_depths_unavailable", error=str(exc))
        return {q: None for q in QUEUES}
    return depths


@dataclass
class BotStatusReport:
    state: str
    reason: str
    since: datetime | None
    by: str
    brain: str
    exchange: str
    broker: str
    equity: Decimal | None
    today_pnl: Decimal
    llm_cost_today: Decimal
    positions: list[dict[str, Any]] = field(default_factory=list)
    last_cycles: list[dict[str, Any]] = field(default_factory=list)
    queues: dict[str, int | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    account_sync_failures_24h: int = 0  # failed account syncs journaled in the last 24 h (#16)
    streams: list[dict[str, Any]] = field(default_factory=list)
    streams_health: dict[str, Any] = field(default_factory=dict)  # market.selectors.streams_health (#19)


def bot_status(*, exchange: Any | None = None) -> BotStatusReport:
    from brain.base import brain_name_for_settings
    from execution.selectors import account_state, bot_state, positions_open

    bot = bot_state()
    midnight = timezone.make_aware(datetime.combine(timezone.now().date(), dtime.min))
    errors: list[str] = []
    equity = None
    positions: list[dict[str, Any]] = []
    exchange_name = ""
    try:
        if exchange is None:
            from execution.exchanges import exchange_from_settings

            exchange = exchange_from_settings()
        exchange_name = getattr(exchange, "name", type(exchange).__name__)
        equity = account_state(exchange=exchange).equity
        positions = [
            {"inst_id": p.inst_id, "side": p.pos_side, "size": str(p.size), "entry": str(p.avg_px),
             "upl": str(p.unrealized_pnl), "sl": str(p.stop_loss), "tp": str(p.take_profit)}
            for p in positions_open(exchange=exchange)
        ]
    except Exception as exc:  # noqa: BLE001 - an unreachable exchange is reported, not fatal
        errors.append(f"exchange: {type(exc).__name__}: {exc}")
    from execution.outages import exchange_outage_began

    outage = exchange_outage_began(mode=settings.BOT_MODE)
    if outage is not None:  # what the workers found (#16): said plainly, with what protects the positions
        errors.append(f"exchange unreachable since {outage:%Y-%m-%d %H:%M:%S} UTC: no new entries; open positions are "
                      "protected by their exchange-side stops (verified when it answers again)")
    pnl = Trade.objects.filter(mode=Mode.LIVE, status=TradeStatus.CLOSED, closed_at__gte=midnight).aggregate(v=Sum("pnl_usd"))["v"]
    cost = LlmCall.objects.filter(mode=Mode.LIVE, created_at__gte=midnight).aggregate(v=Sum("cost_usd"))["v"]
    last_cycles = []
    for inst in Instrument.objects.filter(trading_enabled=True):
        c = Cycle.objects.filter(instrument=inst, mode=Mode.LIVE).order_by("-id").first()
        last_cycles.append({
            "inst_id": inst.inst_id,
            "cycle": c.pk if c else None,
            "as_of": c.as_of.isoformat() if c else None,
            "state": c.state if c else None,
            "outcome": c.outcome if c else None,
            "reason": (c.reason[:100] if c else ""),
        })
    return BotStatusReport(
        account_sync_failures_24h=account_sync_failures(since=timezone.now() - timedelta(hours=24)),
        state=str(bot.state), reason=bot.reason, since=bot.since, by=bot.by,
        brain=brain_name_for_settings(None), exchange=exchange_name, broker=settings.BROKER_KIND,
        equity=equity, today_pnl=pnl or Decimal(0), llm_cost_today=cost or Decimal(0),
        positions=positions, last_cycles=last_cycles, queues=queue_depths(), errors=errors, streams=streams_status(),
        streams_health=streams_health(),
    )


def account_sync_failures(*, since: datetime) -> int:
    """Failed account syncs since `since`: each `account_sync_failed` event counts its `data.count` (default 1)."""
    from journal.models import JournalEvent

    rows = JournalEvent.objects.filter(kind="account_sync_failed", created_at__gte=since).values_list("data", flat=True)
    return sum(int((d or {}).get("count", 1)) for d in rows)


def streams_health() -> dict[str, Any]:
    """The OKX stream process's health: what `bot status` prints and the health check can call (#19)."""
    from market.selectors import streams_health as health

    return health()


def streams_status() -> list[dict[str, Any]]:
    """`manage.py stream_okx`'s connections as it last wrote them (empty when it never ran)."""
    from market.models import StreamStatus

    return [{"name": s.name, "connected": s.connected, "stopped": s.stopped, "reconnects": s.reconnects,
             "messages": s.messages, "last_message_at": s.last_message_at.isoformat() if s.last_message_at else None,
             "updated_at": s.updated_at.isoformat(), "last_by_channel": s.last_by_channel, "error": s.error}
            for s in StreamStatus.objects.all()]


def broker_dirs_ensure() -> None:
    """The embedded (filesystem) broker needs its folders before a worker starts."""
    if settings.BROKER_KIND == "filesystem":
        for sub in ("queue", "processed", "control"):
            (settings.BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
