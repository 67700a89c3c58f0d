"""Validated promotion: a candidate playbook trades only after a replay says it is not worse.

`playbook_candidate_validate` replays the recent past (PLAYBOOK_VALIDATION_DAYS,
on the same market data: the stored candles, or the synthetic market when the
bot runs on it) twice through the pipeline's replay loop (`tradebot.replay`,
mode=replay, its own run ids, so the live statistics are never touched): once
with the active version, once with the candidate. The replays use the rules
brain, which trades the playbook's machine-readable strategies, so a Claude
candidate is judged on the same rules without paying for LLM calls.

Promotion rule: the candidate's PLAYBOOK_VALIDATION_METRIC (profit factor by
default) is >= the active version's, and its max drawdown (fraction of peak
equity) is not worse by more than PLAYBOOK_MAX_DRAWDOWN_MARGIN. A profit
factor with no trades at all is undefined; it ranks as 1.0 (no money made or
lost), so "switch a losing strategy off" beats a losing version and loses to
a winning one. Promoted or not, the candidate keeps the replay figures and
the reason in `PlaybookVersion.validation`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from brain.models import PlaybookStatus, PlaybookVersion
from brain.performance import performance_summarize, summary_as_dict, trade_record_from_row
from brain.playbook import playbook_current, playbook_transition
from journal.models import Mode, Trade, TradeStatus
from journal.services import event_record
from market.feeds.base import MarketFeed
from tradebot.logging import get_logger

log = get_logger(__name__)

NO_TRADES_PROFIT_FACTOR = Decimal(1)


class ValidationError(Exception):
    """A candidate cannot be validated (unknown id, not a candidate, no market data)."""


@dataclass
class ValidationOutcome:
    candidate_version: int
    current_version: int
    promoted: bool
    reason: str
    figures: dict[str, Any]


def _metric(summary: Any, metric: str) -> Decimal:
    if metric == "profit_factor":
        return summary.profit_factor if summary.profit_factor is not None else NO_TRADES_PROFIT_FACTOR
    if metric == "sharpe":
        return summary.sharpe_ratio if summary.sharpe_ratio is not None else Decimal(0)
    return summary.total_pnl


def promotion_decide(*, current: Any, candidate: Any, metric: str | None = None,
                     drawdown_margin: Decimal | None = None) -> tuple[bool, str]:
    """Pure rule over two PerformanceSummary objects: (promote?, why)."""
    metric = metric or settings.PLAYBOOK_VALIDATION_METRIC
    margin = settings.PLAYBOOK_MAX_DRAWDOWN_MARGIN if drawdown_margin is None else drawdown_margin
    cur, cand = _metric(current, metric), _metric(candidate, metric)
    cur_dd, cand_dd = current.max_drawdown_pct or Decimal(0), candidate.max_drawdown_pct or Decimal(0)
    facts = (f"{metric} {cand:.4f} vs {cur:.4f}; max drawdown {cand_dd:.4%} vs {cur_dd:.4%} (margin {margin:.2%}); "
             f"trades {candidate.total_trades} vs {current.total_trades}; pnl {candidate.total_pnl:.2f} vs {current.total_pnl:.2f}")
    if cand < cur:
        return False, f"worse {metric} than the active version: {facts}"
    if cand_dd > cur_dd + margin:
        return False, f"max drawdown worse by more than the margin: {facts}"
    return True, f"not worse: {facts}"


def market_now(*, inst_ids: list[str]) -> datetime:
    """The market's own "now": the newest stored candle, else wall time.

    "The recent past" is the past of the market the bot trades: on a replayed
    or virtual clock (the demo) that is not the wall clock.
    """
    from django.db.models import Max

    from market.models import Candle

    latest = Candle.objects.filter(instrument__inst_id__in=inst_ids).aggregate(m=Max("ts"))["m"]
    return min(latest, timezone.now()) if latest else timezone.now()


def validation_feed(*, inst_ids: list[str], since: datetime, until: datetime) -> tuple[MarketFeed, str]:
    """The market data the bot trades on: stored candles when there are any, else the synthetic market."""
    from market.feeds.replay import ReplayFeed
    from market.models import Candle

    if Candle.objects.filter(instrument__inst_id__in=inst_ids, ts__gte=since, ts__lte=until).exists():
        warmup = timedelta(seconds=settings.INDICATOR_HISTORY_CANDLES * 3600 * 4)  # indicators need history before `since`
        return ReplayFeed.from_db(inst_ids=inst_ids, timeframes=["5m", *settings.TIMEFRAMES], since=since - warmup, until=until), "database"
    from market.feeds import synthetic_feed_from_settings

    return synthetic_feed_from_settings(), "synthetic"


def _replay_summary(*, version: int, inst_ids: list[str], start: datetime, end: datetime, feed: MarketFeed,
                    cycle: timedelta, label: str) -> tuple[Any, list[str]]:
    from tradebot.replay import replay_run

    run_ids = []
    for inst_id in inst_ids:
        run_id = f"validate-{label}-v{version}-{uuid.uuid4().hex[:8]}"[:64]
        replay_run(inst_id=inst_id, start=start, end=end, feed=feed, brain="rules", cycle=cycle, run_id=run_id,
                   playbook_version=version)
        run_ids.append(run_id)
    rows = Trade.objects.filter(mode=Mode.REPLAY, run_id__in=run_ids, status=TradeStatus.CLOSED, pnl_usd__isnull=False)
    summary = performance_summarize([trade_record_from_row(t) for t in rows.select_related("instrument")],
                                    starting_equity=Decimal(settings.PAPER_START_BALANCE))
    return summary, run_ids


def playbook_candidate_validate(
    *,
    candidate_id: int,
    days: int | None = None,
    inst_ids: list[str] | None = None,
    feed: MarketFeed | None = None,
    end: datetime | None = None,
    cycle: timedelta = timedelta(minutes=5),
) -> ValidationOutcome:
    """Replay the candidate (PlaybookVersion pk) against the active version; promote or reject it, with figures."""
    days = days or settings.PLAYBOOK_VALIDATION_DAYS
    candidate = PlaybookVersion.objects.filter(pk=candidate_id).first()
    if candidate is None:
        raise ValidationError(f"playbook candidate {candidate_id} does not exist")
    if candidate.status != PlaybookStatus.CANDIDATE:
        raise ValidationError(f"playbook v{candidate.version} is {candidate.status}, not a candidate")
    current = playbook_current()
    inst_ids = inst_ids or list(settings.INSTRUMENTS)
    end = end or market_now(inst_ids=inst_ids)
    start = end - timedelta(days=days)
    source = "given"
    if feed is None:
        feed, source = validation_feed(inst_ids=inst_ids, since=start, until=end)
    data_end = min(feed.data_range(i)[1] for i in inst_ids)  # type: ignore[attr-defined]
    if data_end < end:  # the data stops earlier (e.g. candles not synced yet): the same window ending there
        end, start = data_end, data_end - timedelta(days=days)

    cur_summary, cur_runs = _replay_summary(version=current.version, inst_ids=inst_ids, start=start, end=end, feed=feed, cycle=cycle, label="cur")
    cand_summary, cand_runs = _replay_summary(version=candidate.version, inst_ids=inst_ids, start=start, end=end, feed=feed, cycle=cycle, label="cand")
    promoted, reason = promotion_decide(current=cur_summary, candidate=cand_summary)
    figures = {
        "metric": settings.PLAYBOOK_VALIDATION_METRIC,
        "drawdown_margin": str(settings.PLAYBOOK_MAX_DRAWDOWN_MARGIN),
        "window": {"from": start.isoformat(), "to": end.isoformat(), "days": days, "inst_ids": inst_ids, "source": source,
                   "brain": "rules", "cycle_seconds": int(cycle.total_seconds())},
        "current": {"version": current.version, "run_ids": cur_runs, **_headline(cur_summary)},
        "candidate": {"version": candidate.version, "run_ids": cand_runs, **_headline(cand_summary)},
        "promoted": promoted,
        "reason": reason,
        "validated_at": timezone.now().isoformat(),
    }
    with transaction.atomic():
        fresh = PlaybookVersion.objects.select_for_update().get(pk=candidate.pk)
        if fresh.status != PlaybookStatus.CANDIDATE:
            raise ValidationError(f"playbook v{fresh.version} was decided meanwhile ({fresh.status})")
        playbook_transition(version=fresh, to=PlaybookStatus.ACTIVE if promoted else PlaybookStatus.REJECTED, validation=figures)
    event_record(kind="playbook_promoted" if promoted else "playbook_rejected", level="info" if promoted else "warning",
                 message=f"playbook v{candidate.version} {'promoted over' if promoted else 'not promoted; stays behind'} v{current.version}: {reason}",
                 data={"candidate": candidate.version, "current": current.version})
    return ValidationOutcome(candidate_version=candidate.version, current_version=current.version, promoted=promoted,
                             reason=reason, figures=figures)


def _headline(summary: Any) -> dict[str, Any]:
    full = summary_as_dict(summary)
    keys = ("total_trades", "wins", "losses", "win_rate", "profit_factor", "sharpe_ratio", "total_pnl", "max_drawdown_usd",
            "max_drawdown_pct", "max_consecutive_losses")
    return {**{k: full[k] for k in keys}, "by_strategy": full["by_strategy"]}


def learning_run(*, now: datetime | None = None, force: bool = False, brain_name: str | None = None,
                 validate: bool = True, mode: str = Mode.LIVE, run_id: str = "", **validate_kwargs: Any) -> dict[str, Any]:
    """Deep reflection (when due or forced), then validation of the candidate it produced.

    `mode`/`run_id` reflect on one replay run's trades instead of the bot's own.
    """
    from brain.reflection import deep_reflection_run

    outcome = deep_reflection_run(now=now, force=force, brain_name=brain_name, mode=mode, run_id=run_id)
    result: dict[str, Any] = {"reflection": outcome.status, "reason": outcome.reason, "log_id": outcome.log_id,
                              "trade_ids": outcome.trade_ids, "candidate_version": outcome.candidate_version,
                              "dropped_lessons": outcome.dropped, "validation": None}
    if validate and outcome.candidate_version is not None:
        candidate = PlaybookVersion.objects.get(version=outcome.candidate_version)
        validation = playbook_candidate_validate(candidate_id=candidate.pk, **validate_kwargs)
        result["validation"] = {"promoted": validation.promoted, "reason": validation.reason, "figures": validation.figures}
    return result
