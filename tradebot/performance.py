"""Performance snapshots (hourly, daily, weekly) into the journal.

The figures come from `brain.performance` (one definition of win rate,
profit factor, per-trade Sharpe and drawdown for the admin, reflection and
replay) over the closed trades of the period; equity comes from the exchange.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.utils import timezone

from brain.performance import performance_summarize, summary_as_dict, trade_record_from_row
from journal.models import Mode, PerformancePeriod, PerformanceSnapshot, Trade, TradeStatus
from tradebot.logging import get_logger

log = get_logger(__name__)

PERIODS: dict[str, timedelta] = {
    PerformancePeriod.HOURLY: timedelta(hours=1),
    PerformancePeriod.DAILY: timedelta(days=1),
    PerformancePeriod.WEEKLY: timedelta(days=7),
}
_MAX_DECIMAL = Decimal("99999999")  # the profit factor column's range; infinity (no losses) is stored as None


def _fits(value: Decimal | None, limit: Decimal = _MAX_DECIMAL) -> Decimal | None:
    if value is None or not value.is_finite() or abs(value) > limit:
        return None
    return value


def performance_snapshot_record(
    *, period: str, exchange: Any | None = None, mode: str = Mode.LIVE, run_id: str = "", now: datetime | None = None
) -> PerformanceSnapshot:
    """Summarise the trades closed in the last `period` and write a PerformanceSnapshot."""
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    now = now or timezone.now()
    since = now - PERIODS[period]
    rows = Trade.objects.filter(
        mode=mode, run_id=run_id, status=TradeStatus.CLOSED, closed_at__gt=since, closed_at__lte=now, pnl_usd__isnull=False
    ).select_related("instrument")
    equity: Decimal | None = None
    if exchange is not None:
        from execution.selectors import account_state

        equity = account_state(exchange=exchange).equity
    summary = performance_summarize([trade_record_from_row(t) for t in rows], starting_equity=equity)
    playbook_version = None
    try:
        from brain.playbook import playbook_current

        playbook_version = playbook_current().version
    except Exception as exc:  # noqa: BLE001 - a snapshot without the version beats no snapshot
        log.warning("performance_playbook_unavailable", error=str(exc))
    metrics = summary_as_dict(summary)
    metrics["since"] = since.isoformat()
    snapshot = PerformanceSnapshot.objects.create(
        snapshot_type=period,
        mode=mode,
        equity=equity,
        total_pnl=summary.total_pnl,
        win_rate=summary.win_rate,
        profit_factor=_fits(summary.profit_factor),
        sharpe_ratio=_fits(summary.sharpe_ratio),
        max_drawdown=_fits(summary.max_drawdown_pct, Decimal("9999")),
        total_trades=summary.total_trades,
        playbook_version=playbook_version,
        metrics_json=metrics,
    )
    log.info("performance_snapshot", period=period, trades=summary.total_trades, pnl=str(summary.total_pnl))
    return snapshot
