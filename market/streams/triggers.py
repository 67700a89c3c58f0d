"""Stream triggers: a condition on a live price that should start an instrument's cycle at once.

`stream_triggers_check` is the one place the stream asks "should this tick start a cycle?".
Each trigger is a named condition `(watch, price, now) -> reason or None`; a trigger FIRES when
its condition becomes true (it was false at the previous tick), so a move that stays beyond
the threshold starts one cycle, not one per tick, and fires again only after it came back
inside and crossed out again. The cycle itself still obeys the one-cycle-per-instrument rule
(`tradebot.cycle.cycle_open` records a SKIPPED cycle when one runs).

Two triggers:
- `move_1h`: the screener's 1H-move bypass (`ANOMALY_MOVE_1H_PCT`, measured as the snapshot
  measures it: price / the close of the finest candle closed at or before now - 1 h, minus 1);
- `position_watch`: the position watch's price triggers (brain.watch), for an instrument with a
  position open: the price moved POSITION_WATCH_ATR_MULTIPLE x the 1H ATR from the analyst's last
  review, or the stop loss / take profit is within POSITION_WATCH_SLTP_NEAR_ATR x ATR. The levels
  (`PositionLevels`) come from the journal; the stream process refreshes them every few seconds.
Another trigger joins by adding its condition to `TRIGGERS` (or passing its own list).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

HOUR = 3600.0
KEEP_CLOSES = 16  # per timeframe: enough for "the close one hour ago" on 15m (and 1H as the fallback)


@dataclass(frozen=True)
class PositionLevels:
    """What the position watch compares a live price with (floats: a trigger is a comparison, not an amount)."""

    review_price: float  # the price at the analyst's last review of this instrument (else the entry)
    atr: float  # the 1H ATR(14) of the instrument's last snapshot, in price units
    stop_loss: float | None
    take_profit: float | None
    atr_multiple: float  # POSITION_WATCH_ATR_MULTIPLE
    near_atr: float  # POSITION_WATCH_SLTP_NEAR_ATR


@dataclass
class InstrumentWatch:
    """One instrument's live state the triggers look at (event-loop only)."""

    inst_id: str
    move_threshold: float  # ANOMALY_MOVE_1H_PCT as a fraction
    # (close time in epoch seconds, close) of recent closed candles per timeframe, oldest first.
    closes: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    active: dict[str, bool] = field(default_factory=dict)  # which conditions held at the last tick
    last_price: float | None = None
    position: PositionLevels | None = None  # set while a position is open (the position watch's levels)
    _ref: tuple[float, float, float | None] | None = None  # (valid from, valid until, reference close)

    def candle_closed(self, timeframe: str, close_time: float, close: float) -> None:
        series = self.closes.setdefault(timeframe, [])
        if series and close_time <= series[-1][0]:
            if close_time == series[-1][0]:
                series[-1] = (close_time, close)
            else:
                bisect.insort(series, (close_time, close))
        else:
            series.append((close_time, close))
        del series[:-KEEP_CLOSES]
        self._ref = None

    def reference_1h(self, now: float) -> float | None:
        """The close of the finest candle (15m, else 1H) that closed at or before now - 1 h."""
        ref = self._ref
        if ref is not None and ref[0] <= now < ref[1]:
            return ref[2]
        target = now - HOUR
        for timeframe in ("15m", "1H"):
            series = self.closes.get(timeframe)
            if not series:
                continue
            i = bisect.bisect_right(series, (target, float("inf")))
            if i == 0:
                return None  # no candle that old known: no reference (the snapshot says None too)
            until = series[i][0] + HOUR if i < len(series) else float("inf")
            self._ref = (series[i - 1][0] + HOUR, until, series[i - 1][1])
            return series[i - 1][1]
        return None


Trigger = Callable[[InstrumentWatch, float, float], "str | None"]


def move_1h_trigger(watch: InstrumentWatch, price: float, now: float) -> str | None:
    """The screener's bypass: |1H move| beyond ANOMALY_MOVE_1H_PCT."""
    ref = watch.reference_1h(now)
    if ref is None or ref <= 0:
        return None
    move = price / ref - 1.0
    if abs(move) > watch.move_threshold:
        return f"1H move {move:+.2%} beyond ±{watch.move_threshold:.2%} (stream price {price:g})"
    return None


def position_watch_trigger(watch: InstrumentWatch, price: float, now: float) -> str | None:
    """The position watch's price triggers (brain.watch.position_review_due), on the live price."""
    levels = watch.position
    if levels is None or levels.atr <= 0:
        return None
    moved = abs(price - levels.review_price) / levels.atr
    if moved >= levels.atr_multiple:
        return f"position watch: price moved {moved:.2f} ATR since the last review ({levels.review_price:g} -> {price:g})"
    near = levels.near_atr * levels.atr
    for name, level in (("stop loss", levels.stop_loss), ("take profit", levels.take_profit)):
        if level is not None and abs(price - level) <= near:
            return f"position watch: {name} {level:g} is {abs(price - level) / levels.atr:.2f} ATR from {price:g}"
    return None


TRIGGERS: list[tuple[str, Trigger]] = [("move_1h", move_1h_trigger), ("position_watch", position_watch_trigger)]


def stream_triggers_check(*, watch: InstrumentWatch, price: float, now: float,
                          triggers: list[tuple[str, Trigger]] | None = None) -> list[str]:
    """The reasons of the triggers that fire at this tick (their condition just became true)."""
    watch.last_price = price
    fired: list[str] = []
    for name, condition in TRIGGERS if triggers is None else triggers:
        reason = condition(watch, price, now)
        held = reason is not None
        if held and not watch.active.get(name, False):
            fired.append(reason)  # type: ignore[arg-type]
        watch.active[name] = held
    return fired
