"""When the analyst is worth asking again: the position watch and the unchanged-snapshot skip.

The analyst (Opus) is the cost that matters. Two deterministic rules keep it
from being asked when nothing material happened since it last looked at an
instrument (its last *review*: the last cycle that reached the analyst):

- The position watch. While a position is open its exchange-side stop loss and
  take profit protect it; the analyst is asked again only when a trigger fires:
  the price moved POSITION_WATCH_ATR_MULTIPLE x the 1H ATR since the review, the
  stop loss or take profit is within POSITION_WATCH_SLTP_NEAR_ATR x ATR, the 1H
  regime changed, a funding spike began, a news window is open, a >3% 1H move.
  Without a trigger, once POSITION_WATCH_MAX_INTERVAL_SECONDS passed since the
  review (or since the last position check), the review is routine: with
  POSITION_WATCH_PERIODIC_CHECK the screener model is first asked a short
  position check (brain.services) and the analyst only when it says wake, the
  check fails, or the review is POSITION_WATCH_MAX_UNREVIEWED_SECONDS old (the
  hard maximum). Otherwise the review is skipped and journaled with its reason
  (a ScreenerLog row, like a screener's "no").
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

from dataclasses import dataclass, replace
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
    # Indicators the position check compares with (None from a compact journal snapshot).
    rsi_15m: float | None = None
    rsi_1h: float | None = None
    macd_hist_1h: float | None = None
    adx_1h: float | None = None
    # Position checks that said "no" since this review: the last one's time and how many.
    checked_at: datetime | None = None
    checks: int = 0


@dataclass(frozen=True)
class WatchVerdict:
    """What the position watch does this cycle: ask the analyst, ask the position check first, or skip."""

    action: str  # "analyst", "check" or "skip"
    reason: str


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


def indicator(snapshot: MarketSnapshot, tf: str, name: str) -> float | None:
    view = snapshot.timeframes.get(tf)
    value = getattr(view.indicators, name, None) if view is not None else None
    return None if value is None else float(value)


def review_mark(snapshot: MarketSnapshot, action: str) -> ReviewMark:
    return ReviewMark(as_of=snapshot.ts, price=Decimal(snapshot.price), regime=str(snapshot.regime), action=str(action),
                      funding_spike=_funding_spike(snapshot), rsi_zone=_rsi_zone(snapshot),
                      rsi_15m=indicator(snapshot, "15m", "rsi_14"), rsi_1h=indicator(snapshot, "1H", "rsi_14"),
                      macd_hist_1h=indicator(snapshot, "1H", "macd_hist"), adx_1h=indicator(snapshot, "1H", "adx_14"))


def review_mark_checked(mark: ReviewMark, *, at: datetime) -> ReviewMark:
    """The mark after a position check said "no" at `at` (the analyst's review itself is unchanged)."""
    return replace(mark, checked_at=at, checks=mark.checks + 1)


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

    cycles = Cycle.objects.filter(instrument__inst_id=inst_id, mode=mode, run_id=run_id, as_of__lt=before)
    row = (cycles.filter(decision__isnull=False)
           .order_by("-as_of", "-id").values("as_of", "snapshot", "decision").first())
    if row is None:
        return None
    mark = review_mark_from_cycle(as_of=row["as_of"], snapshot=row["snapshot"], decision=row["decision"])
    if mark is None:
        return None
    # The position checks since that review that said "no" (SCREENING keeps each check on its cycle).
    checks = (cycles.filter(as_of__gt=row["as_of"], screener_result__has_key="position_check")
              .order_by("as_of").values_list("as_of", "screener_result"))
    for as_of, screened in checks:
        if not (screened.get("position_check") or {}).get("wake", True):
            mark = review_mark_checked(mark, at=as_of)
    return mark


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
                        now: datetime) -> WatchVerdict:
    """Whether the analyst is asked (a trigger, or the hard maximum), the position check first, or neither.

    The triggers come first: a material change always reaches the analyst directly. Without one, the max
    interval (counted from the review, or from the last check that said no) makes a routine review: a
    position check when POSITION_WATCH_PERIODIC_CHECK is on and the review is younger than the hard maximum.
    """
    if last is None:
        return WatchVerdict("analyst", "no earlier review of this position")
    atr = _atr(snapshot)
    price = Decimal(snapshot.price)
    age = (now - last.as_of).total_seconds()
    moved = abs(price - last.price) / atr if atr > 0 else Decimal(0)
    if moved >= settings.POSITION_WATCH_ATR_MULTIPLE:
        return WatchVerdict("analyst", f"price moved {moved:.2f} ATR since the last review ({last.price} -> {price})")
    near = settings.POSITION_WATCH_SLTP_NEAR_ATR * atr
    for name, level in (("stop loss", position.stop_loss), ("take profit", position.take_profit)):
        if level is not None and abs(price - Decimal(level)) <= near:
            return WatchVerdict("analyst", f"{name} near: {level} is {abs(price - Decimal(level)) / atr:.2f} ATR from {price}")
    common = _common_triggers(snapshot, last, now)
    if common:
        return WatchVerdict("analyst", common[0])
    interval = settings.POSITION_WATCH_MAX_INTERVAL_SECONDS
    since = (now - (last.checked_at or last.as_of)).total_seconds()
    if since >= interval:
        if not settings.POSITION_WATCH_PERIODIC_CHECK:
            return WatchVerdict("analyst", f"max interval: {age / 60:.0f} min since the last review")
        if age >= settings.POSITION_WATCH_MAX_UNREVIEWED_SECONDS:
            return WatchVerdict("analyst", f"hard maximum: {age / 3600:.1f} h since the last review "
                                           f"({last.checks} position check(s) said no)")
        return WatchVerdict("check", f"routine review: {age / 60:.0f} min since the last review, no trigger")
    checked = f", checked at {last.checked_at:%H:%M}" if last.checked_at else ""
    return WatchVerdict("skip", f"position watch: no trigger ({moved:.2f} ATR since the review at {last.as_of:%H:%M}"
                                f"{checked}, {since / 60:.0f} of {interval / 60:.0f} min; SL/TP not near)")


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
