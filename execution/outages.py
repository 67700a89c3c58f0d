"""Exchange outages (#16): one journal event when the exchange stops answering, and, at the first answer after it,
every open position's exchange-side stop loss and take profit verified and journaled.

While the exchange is unreachable no entry is attempted (the stage that meets it fails its cycle at once) and the
open positions are protected by the stops the exchange holds; `bot status` says so (tradebot.controls).
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from django.utils import timezone

from execution.exchanges.base import Position
from journal.models import EventLevel, JournalEvent, Mode, Trade, TradeStatus
from journal.services import event_record

OUTAGE_BEGAN, OUTAGE_ENDED = "exchange_unreachable", "exchange_reachable"


def exchange_outage_began(*, mode: str = Mode.LIVE) -> datetime | None:
    """When the exchange outage still open began (its first failure), or None while the exchange answers."""
    last = (JournalEvent.objects.filter(kind__in=(OUTAGE_BEGAN, OUTAGE_ENDED), mode=mode)
            .order_by("-created_at", "-id").values_list("kind", "created_at").first())
    return last[1] if last is not None and last[0] == OUTAGE_BEGAN else None


def exchange_unreachable_record(*, error: str, where: str, mode: str = Mode.LIVE) -> bool:
    """A call found the exchange unreachable: one journal event per outage, at its first failure (`bot status`, the
    cockpit and the alerts read it); the caller's own line logs each failure. True when this one began the outage."""
    if exchange_outage_began(mode=mode) is not None:
        return False
    event_record(kind=OUTAGE_BEGAN, level=EventLevel.ERROR, mode=mode, data={"where": where},
                 message=f"exchange unreachable ({where}: {error}): no new entries until it answers; open positions "
                         "are protected by their exchange-side stops")
    return True


def exchange_outage_end(*, positions: list[Position], mode: str = Mode.LIVE) -> dict[str, Any] | None:
    """The exchange answered (`positions` just read from it): if an outage was open, verify that every open
    position still has its exchange-side stop loss and take profit, journal what was found and close the outage.

    A position without an exchange-side stop is an ERROR event naming it (a person must protect it: the bot
    never opened one without); otherwise INFO. None when no outage was open.
    """
    began = exchange_outage_began(mode=mode)
    if began is None:
        return None
    trades = {(t.instrument.inst_id, t.direction.lower()): t
              for t in Trade.objects.filter(status=TradeStatus.OPEN, mode=mode, run_id="").select_related("instrument")}
    checked = []
    for pos in positions:
        trade = trades.get((pos.inst_id, pos.pos_side))
        checked.append({
            "inst_id": pos.inst_id, "pos_side": pos.pos_side, "size": str(pos.size),
            "stop_loss": None if pos.stop_loss is None else str(pos.stop_loss),
            "take_profit": None if pos.take_profit is None else str(pos.take_profit),
            "journal_stop_loss": None if trade is None or trade.stop_loss is None else str(trade.stop_loss),
            "journal_take_profit": None if trade is None or trade.take_profit is None else str(trade.take_profit),
        })
    unprotected = [c for c in checked if c["stop_loss"] is None]
    lasted = (timezone.now() - began).total_seconds()
    if unprotected:
        names = ", ".join(f"{c['inst_id']} {c['pos_side']}" for c in unprotected)
        message = (f"exchange reachable again after {lasted:.0f}s; {len(unprotected)} of {len(checked)} open "
                   f"position(s) have NO exchange-side stop loss: {names}")
    else:
        message = (f"exchange reachable again after {lasted:.0f}s; the exchange-side stop loss"
                   f"{' and take profit' if all(c['take_profit'] for c in checked) else ''} of each of "
                   f"{len(checked)} open position(s) verified")
    data = {"outage_began": began.isoformat(), "outage_seconds": round(lasted, 1), "positions": checked,
            "unprotected": len(unprotected)}
    event_record(kind=OUTAGE_ENDED, level=EventLevel.ERROR if unprotected else EventLevel.INFO, mode=mode,
                 message=message, data=data)
    return data


__all__ = ["OUTAGE_BEGAN", "OUTAGE_ENDED", "exchange_outage_began", "exchange_outage_end", "exchange_unreachable_record"]
