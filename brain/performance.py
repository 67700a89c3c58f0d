"""Performance metrics over closed trades (the seed's `PerformanceSummary`).

Pure functions over plain values: no database, no clock. `TradeRecord` is what
a journal `Trade` row becomes (`trade_record_from_row`), so replays, deep
reflection and the admin all compute the same figures the same way.

Definitions (they matter when two playbooks are compared):
- a trade is a win when its net PnL (fees and funding included) is > 0, a
  loss when < 0, breakeven when exactly 0;
- profit factor = gross profit / gross loss; `None` with no trades or when
  both are zero, `Decimal("Infinity")` when there are wins and no losses;
- Sharpe is PER TRADE, not annualised: mean / sample standard deviation
  (n - 1) of the per-trade net PnL in USD; `None` under 2 trades or when
  every trade made the same PnL. Trades are irregular in time, so an
  annualisation factor would invent a frequency the bot does not have;
- max drawdown is the largest fall of the cumulative PnL curve (starting at
  0, trades in closing order) from its running peak, in USD, and as a
  fraction of the equity peak when a starting equity is given;
- the hour-of-day breakdown uses the UTC hour the trade was OPENED (the hour
  the decision was taken, which is what a time filter can act on);
- confidence calibration groups trades by stated confidence in buckets
  0.0-0.5, 0.5-0.6, 0.6-0.7, 0.7-0.8, 0.8-0.9, 0.9-1.0 (the last includes
  1.0) and sets the realised win rate beside the mean stated confidence.
Money and ratios are `Decimal`; `summary_as_dict` renders them as strings so
the result is JSON for prompts and the journal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Iterable

ZERO = Decimal("0")
INFINITY = Decimal("Infinity")
CALIBRATION_EDGES: tuple[Decimal, ...] = tuple(Decimal(x) for x in ("0.0", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"))


@dataclass(frozen=True)
class TradeRecord:
    """A closed trade as plain values."""

    id: int
    pnl_usd: Decimal
    opened_at: datetime
    closed_at: datetime
    strategy: str = ""
    regime: str = ""
    confidence: Decimal | None = None
    direction: str = ""
    inst_id: str = ""
    pnl_pct: Decimal | None = None
    fees_usd: Decimal = ZERO
    funding_usd: Decimal = ZERO
    exit_reason: str = ""


@dataclass(frozen=True)
class Breakdown:
    trades: int
    wins: int
    losses: int
    win_rate: Decimal | None
    total_pnl: Decimal
    avg_pnl: Decimal | None
    profit_factor: Decimal | None


@dataclass(frozen=True)
class CalibrationEntry:
    trades: int
    wins: int
    stated_confidence: Decimal  # mean stated confidence in the bucket
    realised_win_rate: Decimal
    gap: Decimal  # stated - realised: > 0 means over-confident


@dataclass(frozen=True)
class PerformanceSummary:
    total_trades: int
    wins: int
    losses: int
    breakeven: int
    win_rate: Decimal | None
    avg_win: Decimal | None
    avg_loss: Decimal | None  # negative: the mean of the losing trades' PnL
    gross_profit: Decimal
    gross_loss: Decimal  # positive: the sum of |losses|
    profit_factor: Decimal | None
    sharpe_ratio: Decimal | None
    total_pnl: Decimal
    total_fees: Decimal
    total_funding: Decimal
    max_consecutive_wins: int
    max_consecutive_losses: int
    max_drawdown_usd: Decimal
    max_drawdown_pct: Decimal | None
    first_trade_id: int | None
    last_trade_id: int | None
    by_strategy: dict[str, Breakdown] = field(default_factory=dict)
    by_regime: dict[str, Breakdown] = field(default_factory=dict)
    by_hour: dict[int, Breakdown] = field(default_factory=dict)
    confidence_calibration: dict[str, CalibrationEntry] = field(default_factory=dict)


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    return value if isinstance(value, Decimal) else Decimal(str(value))


def trade_record_from_row(row: Any) -> TradeRecord:
    """Convert a closed journal `Trade` (or anything with its attribute names)."""
    if row.closed_at is None or row.pnl_usd is None:
        raise ValueError(f"trade {row.pk} is not closed (closed_at and pnl_usd are required)")
    instrument = getattr(row, "instrument", None)
    return TradeRecord(
        id=int(row.pk),
        pnl_usd=_dec(row.pnl_usd) or ZERO,
        opened_at=row.opened_at,
        closed_at=row.closed_at,
        strategy=row.strategy_used or "",
        regime=row.market_regime or "",
        confidence=_dec(row.confidence_at_entry),
        direction=row.direction or "",
        inst_id=getattr(instrument, "inst_id", "") if instrument is not None else "",
        pnl_pct=_dec(row.pnl_pct),
        fees_usd=_dec(row.fees_usd) or ZERO,
        funding_usd=_dec(row.funding_usd) or ZERO,
        exit_reason=row.exit_reason or "",
    )


def _ordered(trades: Iterable[TradeRecord]) -> list[TradeRecord]:
    return sorted(trades, key=lambda t: (t.closed_at, t.id))


def profit_factor(pnls: list[Decimal]) -> Decimal | None:
    gross_profit = sum((p for p in pnls if p > 0), ZERO)
    gross_loss = -sum((p for p in pnls if p < 0), ZERO)
    if gross_loss == 0:
        return INFINITY if gross_profit > 0 else None
    return gross_profit / gross_loss


def sharpe_per_trade(pnls: list[Decimal]) -> Decimal | None:
    """Mean / sample standard deviation of per-trade PnL (not annualised)."""
    n = len(pnls)
    if n < 2:
        return None
    mean = sum(pnls, ZERO) / n
    variance = sum(((p - mean) ** 2 for p in pnls), ZERO) / (n - 1)
    if variance == 0:
        return None
    return mean / variance.sqrt()


def max_streaks(pnls: list[Decimal]) -> tuple[int, int]:
    """(max consecutive wins, max consecutive losses); a breakeven ends both streaks."""
    best_w = best_l = cur_w = cur_l = 0
    for p in pnls:
        cur_w = cur_w + 1 if p > 0 else 0
        cur_l = cur_l + 1 if p < 0 else 0
        best_w, best_l = max(best_w, cur_w), max(best_l, cur_l)
    return best_w, best_l


def max_drawdown(pnls: list[Decimal], *, starting_equity: Decimal | None = None) -> tuple[Decimal, Decimal | None]:
    """(largest fall of cumulative PnL from its peak in USD, the same as a fraction of peak equity)."""
    base = starting_equity if starting_equity is not None else ZERO
    equity = peak = base
    dd_usd = ZERO
    dd_pct: Decimal | None = ZERO if starting_equity is not None else None
    for p in pnls:
        equity += p
        peak = max(peak, equity)
        dd_usd = max(dd_usd, peak - equity)
        if starting_equity is not None and peak > 0:
            dd_pct = max(dd_pct or ZERO, (peak - equity) / peak)
    return dd_usd, dd_pct


def _breakdown(trades: list[TradeRecord]) -> Breakdown:
    pnls = [t.pnl_usd for t in trades]
    wins = sum(1 for p in pnls if p > 0)
    total = sum(pnls, ZERO)
    n = len(pnls)
    return Breakdown(
        trades=n,
        wins=wins,
        losses=sum(1 for p in pnls if p < 0),
        win_rate=Decimal(wins) / n if n else None,
        total_pnl=total,
        avg_pnl=total / n if n else None,
        profit_factor=profit_factor(pnls),
    )


def _group(trades: list[TradeRecord], key: Any) -> dict[Any, Breakdown]:
    groups: dict[Any, list[TradeRecord]] = {}
    for t in trades:
        groups.setdefault(key(t), []).append(t)
    # Keys are all str (strategy, regime) or all int (hour), so they sort.
    return {k: _breakdown(groups[k]) for k in sorted(groups)}


def _bucket_label(confidence: Decimal) -> str | None:
    if confidence < 0 or confidence > 1:
        return None
    for lo, hi in zip(CALIBRATION_EDGES, CALIBRATION_EDGES[1:]):
        if lo <= confidence < hi or (hi == CALIBRATION_EDGES[-1] and confidence == hi):
            return f"{lo:.1f}-{hi:.1f}"
    return None


def confidence_bucket(confidence: Decimal) -> str | None:
    """The calibration bucket a stated confidence falls in ("0.6-0.7"), None outside [0, 1]."""
    return _bucket_label(confidence)


def breakdown_from_sums(*, trades: int, wins: int, losses: int, total_pnl: Decimal, gross_profit: Decimal,
                        gross_loss: Decimal) -> Breakdown:
    """A Breakdown from a group's counts and sums (what a database aggregates); the same figures as `_breakdown`
    over the group's trades. gross_loss is positive (the losses' sum negated)."""
    if gross_loss == 0:
        factor = INFINITY if gross_profit > 0 else None
    else:
        factor = gross_profit / gross_loss
    return Breakdown(trades=trades, wins=wins, losses=losses, win_rate=Decimal(wins) / trades if trades else None,
                     total_pnl=total_pnl, avg_pnl=total_pnl / trades if trades else None, profit_factor=factor)


def confidence_calibration(trades: list[TradeRecord]) -> dict[str, CalibrationEntry]:
    buckets: dict[str, list[TradeRecord]] = {}
    for t in trades:
        if t.confidence is None:
            continue
        label = _bucket_label(t.confidence)
        if label is not None:
            buckets.setdefault(label, []).append(t)
    result: dict[str, CalibrationEntry] = {}
    for label in sorted(buckets):
        rows = buckets[label]
        n = len(rows)
        wins = sum(1 for t in rows if t.pnl_usd > 0)
        stated = sum((t.confidence or ZERO for t in rows), ZERO) / n
        realised = Decimal(wins) / n
        result[label] = CalibrationEntry(trades=n, wins=wins, stated_confidence=stated, realised_win_rate=realised, gap=stated - realised)
    return result


def performance_summarize(trades: Iterable[TradeRecord], *, starting_equity: Decimal | None = None) -> PerformanceSummary:
    """The seed's PerformanceSummary over closed trades (any order; sorted by close time here)."""
    ordered = _ordered(trades)
    pnls = [t.pnl_usd for t in ordered]
    n = len(pnls)
    win_pnls = [p for p in pnls if p > 0]
    loss_pnls = [p for p in pnls if p < 0]
    streak_w, streak_l = max_streaks(pnls)
    dd_usd, dd_pct = max_drawdown(pnls, starting_equity=starting_equity)
    return PerformanceSummary(
        total_trades=n,
        wins=len(win_pnls),
        losses=len(loss_pnls),
        breakeven=n - len(win_pnls) - len(loss_pnls),
        win_rate=Decimal(len(win_pnls)) / n if n else None,
        avg_win=sum(win_pnls, ZERO) / len(win_pnls) if win_pnls else None,
        avg_loss=sum(loss_pnls, ZERO) / len(loss_pnls) if loss_pnls else None,
        gross_profit=sum(win_pnls, ZERO),
        gross_loss=-sum(loss_pnls, ZERO),
        profit_factor=profit_factor(pnls),
        sharpe_ratio=sharpe_per_trade(pnls),
        total_pnl=sum(pnls, ZERO),
        total_fees=sum((t.fees_usd for t in ordered), ZERO),
        total_funding=sum((t.funding_usd for t in ordered), ZERO),
        max_consecutive_wins=streak_w,
        max_consecutive_losses=streak_l,
        max_drawdown_usd=dd_usd,
        max_drawdown_pct=dd_pct,
        first_trade_id=ordered[0].id if ordered else None,
        last_trade_id=ordered[-1].id if ordered else None,
        by_strategy=_group(ordered, lambda t: t.strategy or "unknown"),
        by_regime=_group(ordered, lambda t: t.regime or "unknown"),
        by_hour=_group(ordered, lambda t: t.opened_at.astimezone(timezone.utc).hour),
        confidence_calibration=confidence_calibration(ordered),
    )


def _plain(value: Any, places: int = 6) -> Any:
    """Decimals as strings rounded for reading (Infinity stays 'Infinity'); dataclasses as dicts."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        text = f"{value.quantize(Decimal(1).scaleb(-places)):f}"
        # Trim trailing zeros without scientific notation (normalize() would give 3E+1).
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(value, dict):
        return {str(k): _plain(v, places) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, places) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {name: _plain(getattr(value, name), places) for name in value.__dataclass_fields__}
    return value


def summary_as_dict(summary: PerformanceSummary | Breakdown | CalibrationEntry) -> dict[str, Any]:
    """JSON-ready view (Decimals as strings, 6 places) for prompts, the journal and replay reports."""
    return _plain(summary)
