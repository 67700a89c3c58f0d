"""When the analyst is worth asking again: the position watch and the unchanged-snapshot skip.

The analyst (Opus) is the cost that matters. Two deterministic rules keep it
from being asked when nothing material happened since it last looked at an
instrument (its last *review*: the last cycle that reached the analyst):

- The position watch. While a position is open its exchange-side stop loss and
  take profit protect it; the analyst is asked again only when a trigger fires:
  the price moved POSITION_WATCH_ATR_MULTIPLE x the 1H ATR since the review, the
  stop loss or take profit is within POSITION_WATCH_SLTP_NEAR_ATR x ATR, the 1H
  regime changed, a funding spike began, a news window is open, a >3% 1H move,
  or POSITION_WATCH_MAX_INTERVAL_SECONDS passed. Otherwise the review is skipped
  and journaled with its reason (a ScreenerLog row, like a screener's "no").
- The unchanged skip. Flat, after the analyst said HOLD: while the snapshot has
  not changed materially (price within ANALYST_UNCHANGED_ATR_MULTIPLE x ATR of
  the HOLD's, same regime, same funding-spike state, same RSI zone, no news
  window, younger than ANALYST_UNCHANGED_MAX_SECONDS) the analyst is not asked;
  the cycle ends saying so.

Both apply to the LLM brain only: the rules brain costs nothing and keeps
deciding every cycle. Functions here are pure over frozen views, apart from
`review_mark_last`, the journal read that live cycles use.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings

from brain.schemas import PositionView
from market.schemas import MarketSnapshot


@dataclass(frozen=True)
class ReviewMark:
    """What the analyst saw at its last review of an instrument (all the watch compares against)."""

    as_of: datetime
    price: Decimal
    regime: str
    action: str
    funding_spike: bool
    rsi_zone: str  # "low" (<30), "high" (>70) or "mid", on 15m


def _atr(snapshot: MarketSnapshot) -> Decimal:
    """The 1H ATR(14) in price units; 15m's x2 or 1% of the price when it is missing."""
    for tf, scale in (("1H", 1), ("15m", 2)):
        view = snapshot.timeframes.get(tf)
        if view is not None and view.indicators.atr_14:
            return Decimal(str(view.indicators.atr_14)) * scale
    return Decimal(snapshot.price) * Decimal("0.01")


def snapshot_atr(snapshot: MarketSnapshot) -> Decimal:
    """The ATR the position watch measures moves in (the stream's position-watch trigger uses the same)."""
    return _atr(snapshot)


def _funding_spike(snapshot: MarketSnapshot) -> bool:
    funding = snapshot.funding_rate
    return bool(snapshot.anomalies.funding_spike or (
        funding is not None and (funding > settings.FUNDING_SPIKE_HIGH or funding < settings.FUNDING_SPIKE_LOW)))


def _rsi_zone(snapshot: MarketSnapshot) -> str:
    view = snapshot.timeframes.get("15m")
    rsi = view.indicators.rsi_14 if view is not None else None
    if rsi is None:
        return "mid"
    return "low" if rsi < 30 else "high" if rsi > 70 else "mid"


def review_mark(snapshot: MarketSnapshot, action: str) -> ReviewMark:
    return ReviewMark(as_of=snapshot.ts, price=Decimal(snapshot.price), regime=str(snapshot.regime), action=str(action),
                      funding_spike=_funding_spike(snapshot), rsi_zone=_rsi_zone(snapshot))


def review_mark_from_cycle(*, as_of: datetime, snapshot: dict[str, Any] | None, decision: dict[str, Any] | None) -> ReviewMark | None:
    """A review mark from a journaled cycle's JSON (full or compact snapshot)."""
    if not snapshot or not decision:
        return None
    action = str((decision.get("decision") or {}).get("action") or "")
    if snapshot.get("compact"):
        funding = snapshot.get("funding_rate")
        spike = funding is not None and (Decimal(funding) > settings.FUNDING_SPIKE_HIGH or Decimal(funding) < settings.FUNDING_SPIKE_LOW)
        return ReviewMark(as_of=as_of, price=Decimal(snapshot["price"]), regime=str(snapshot.get("regime") or ""),
                          action=action, funding_spike=spike, rsi_zone="mid")
    try:
        return review_mark(MarketSnapshot.model_validate(snapshot), action)
    except ValueError:
        return None


def review_mark_last(*, inst_id: str, mode: str, run_id: str, before: datetime) -> ReviewMark | None:
    """The instrument's last review in the journal (the newest cycle before `before` that has a decision)."""
    from journal.models import Cycle

    row = (Cycle.objects.filter(instrument__inst_id=inst_id, mode=mode, run_id=run_id, as_of__lt=before,
                                decision__isnull=False)
           .order_by("-as_of", "-id").values("as_of", "snapshot", "decision").first())
    if row is None:
        return None
    return review_mark_from_cycle(as_of=row["as_of"], snapshot=row["snapshot"], decision=row["decision"])


def _common_triggers(snapshot: MarketSnapshot, last: ReviewMark, now: datetime) -> list[str]:
    from brain.news import news_event_near

    found = []
    if str(snapshot.regime) != last.regime:
        found.append(f"regime change {last.regime} -> {snapshot.regime}")
    if _funding_spike(snapshot) and not last.funding_spike:
        found.append(f"funding spike {snapshot.funding_rate}")
    move = snapshot.price_change_1h_pct
    if snapshot.anomalies.move_1h or (move is not None and abs(move) > float(settings.ANOMALY_MOVE_1H_PCT)):
        found.append("1H move" if move is None else f"1H move {move * 100:+.2f}%")
    event = news_event_near(now=now)
    if event is not None:
        found.append(f"news window: {event.name} at {event.scheduled_at:%Y-%m-%d %H:%M} UTC")
    return found


def position_review_due(*, snapshot: MarketSnapshot, position: PositionView, last: ReviewMark | None,
                        now: datetime) -> tuple[str, str]:
    """(trigger, skip reason): a non-empty trigger asks the analyst; otherwise the reason it is not asked."""
    if last is None:
        return "no earlier review of this position", ""
    atr = _atr(snapshot)
    price = Decimal(snapshot.price)
    age = (now - last.as_of).total_seconds()
    if age >= settings.POSITION_WATCH_MAX_INTERVAL_SECONDS:
        return f"max interval: {age / 60:.0f} min since the last review", ""
    moved = abs(price - last.price) / atr if atr > 0 else Decimal(0)
    if moved >= settings.POSITION_WATCH_ATR_MULTIPLE:
        return f"price moved {moved:.2f} ATR since the last review ({last.price} -> {price})", ""
    near = settings.POSITION_WATCH_SLTP_NEAR_ATR * atr
    for name, level in (("stop loss", position.stop_loss), ("take profit", position.take_profit)):
        if level is not None and abs(price - Decimal(level)) <= near:
            return f"{name} near: {level} is {abs(price - Decimal(level)) / atr:.2f} ATR from {price}", ""
    common = _common_triggers(snapshot, last, now)
    if common:
        return common[0], ""
    return "", (f"position watch: no trigger ({moved:.2f} ATR since the review at {last.as_of:%H:%M}, "
                f"{age / 60:.0f} of {settings.POSITION_WATCH_MAX_INTERVAL_SECONDS / 60:.0f} min; SL/TP not near)")


def analyst_unchanged_reason(*, snapshot: MarketSnapshot, last: ReviewMark | None, now: datetime) -> str:
    """Why the analyst need not be asked (its last answer was HOLD and nothing material changed), else ""."""
    if last is None or last.action != "HOLD":
        return ""
    age = (now - last.as_of).total_seconds()
    if age >= settings.ANALYST_UNCHANGED_MAX_SECONDS:
        return ""
    atr = _atr(snapshot)
    price = Decimal(snapshot.price)
    moved = abs(price - last.price) / atr if atr > 0 else Decimal(0)
    if moved >= settings.ANALYST_UNCHANGED_ATR_MULTIPLE:
        return ""
    if _rsi_zone(snapshot) != last.rsi_zone or _common_triggers(snapshot, last, now):
        return ""
    return (f"analyst skipped: snapshot unchanged since its HOLD at {last.as_of:%Y-%m-%d %H:%M} "
            f"({moved:.2f} ATR, regime {snapshot.regime}, {age / 60:.0f} min ago)")
