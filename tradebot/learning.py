"""Validated promotion: a candidate trades only when out-of-sample replays say it is better.

Walk-forward, out of sample. `playbook_candidate_validate` places
PLAYBOOK_VALIDATION_FOLDS folds (together PLAYBOOK_VALIDATION_DAYS long) on the
market data the bot trades: the stored candles (the synthetic market only when
MARKET_DATA_SOURCE=synthetic), newest first, skipping the candidate's evidence
window (the trades and time span its reflection learned from, or the search's
training windows): evidence and validation never overlap. Each fold is
replayed on every enabled instrument with the active version and with the
candidate (rules brain, replay mode, own run ids: the live journal is never
touched).

Promotion rule (`promotion_decide`, pure, over the folds' trades):
- fewer than PLAYBOOK_VALIDATION_MIN_TRADES closed trades (both replays
  together) and the candidate WAITS with "not enough evidence";
- a paired bootstrap over per-day returns (both versions on the same days)
  gives P(candidate better); it must exceed PLAYBOOK_PROMOTION_PROBABILITY. A
  tie (the same returns every day) gives P = 0: a tie never promotes;
- no fold's max drawdown may be worse than the active version's by more than
  PLAYBOOK_MAX_DRAWDOWN_MARGIN.
When the analyst is Claude and the candidate changes what the model reads, it is
also judged by re-deciding recorded cycles (`tradebot.validation_claude`): a change
of the rules brain's parameters must pass the rules folds first, a change of text
alone (which a rules replay cannot tell apart) is judged by the re-decision alone.
Without ANTHROPIC_API_KEY such a candidate is not promoted automatically, and the
reason says so.

Promotion is compare-and-swap (`brain.playbook.playbook_promote`): the
candidate replaces the version it was validated against only if that version
is still active; otherwise (a person activated another meanwhile) it is
validated again against the new active version. Every fold's figures, the
test's result and the reason are stored in `PlaybookVersion.validation`.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
from django.conf import settings
from django.db.models import Max, Min
from django.utils import timezone

from brain.base import brain_name_for_settings
from brain.models import PlaybookStatus, PlaybookVersion
from brain.playbook import playbook_current, playbook_promote, playbook_trading_changes, playbook_transition
from journal.models import Mode, Trade, TradeStatus
from journal.services import event_record
from market.feeds.base import MarketFeed
from tradebot.logging import get_logger

log = get_logger(__name__)
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 15  # fixed: the same folds always give the same verdict
# Indicators need history before a fold starts: the first fold starts this long after the data does.
FOLD_WARMUP = timedelta(hours=4 * 50)
MAX_REVALIDATIONS = 3  # the active version changed under us this often: give up for now (the candidate waits)


class ValidationError(Exception):
    """A candidate cannot be validated (unknown id, not a candidate)."""


class Verdict:
    PROMOTED = "promoted"
    REJECTED = "rejected"
    WAITING = "waiting"  # stays a candidate: not enough evidence, or a person must decide


@dataclass
class ValidationOutcome:
    candidate_version: int
    current_version: int
    promoted: bool
    reason: str
    figures: dict[str, Any]
    verdict: str = Verdict.REJECTED


@dataclass
class FoldResult:
    """One fold's closed trades (pnl, close time) of both versions, on every instrument."""

    start: datetime
    end: datetime
    active: list[tuple[Decimal, datetime]] = field(default_factory=list)
    candidate: list[tuple[Decimal, datetime]] = field(default_factory=list)
    equity: Decimal = Decimal(10000)  # the starting equity of the fold's accounts together
    run_ids: dict[str, list[str]] = field(default_factory=lambda: {"active": [], "candidate": []})


def _drawdown(trades: list[tuple[Decimal, datetime]], equity: Decimal) -> Decimal:
    peak = level = equity
    worst = Decimal(0)
    for pnl, _ in sorted(trades, key=lambda t: t[1]):
        level += pnl
        peak = max(peak, level)
        worst = max(worst, (peak - level) / peak if peak else Decimal(0))
    return worst


def _days(fold: FoldResult) -> list[date]:
    first, last = fold.start.date(), (fold.end - timedelta(microseconds=1)).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def daily_differences(folds: list[FoldResult]) -> np.ndarray:
    """Per day of every fold: candidate return minus active return (pnl of trades closed that day / equity)."""
    diffs: list[float] = []
    for fold in folds:
        days = {d: [Decimal(0), Decimal(0)] for d in _days(fold)}
        for side, trades in ((0, fold.active), (1, fold.candidate)):
            for pnl, closed in trades:
                days.setdefault(closed.date(), [Decimal(0), Decimal(0)])[side] += pnl
        diffs.extend(float((c - a) / fold.equity) for a, c in days.values())
    return np.asarray(diffs, dtype=float)


def bootstrap_better(diffs: np.ndarray, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> float:
    """P(mean daily difference > 0) over paired bootstrap resamples; 0 for a tie (all differences 0) or no days."""
    if diffs.size == 0 or not np.any(diffs):
        return 0.0
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(samples, diffs.size))].mean(axis=1)
    return float((means > 0).mean())


def _fold_figures(fold: FoldResult) -> dict[str, Any]:
    def side(trades: list[tuple[Decimal, datetime]]) -> dict[str, Any]:
        wins = sum((p for p, _ in trades if p > 0), Decimal(0))
        losses = -sum((p for p, _ in trades if p < 0), Decimal(0))
        return {"trades": len(trades), "pnl": str(sum((p for p, _ in trades), Decimal(0)).quantize(Decimal("0.01"))),
                "profit_factor": None if not losses else round(float(wins / losses), 4),
                "max_drawdown_pct": round(float(_drawdown(trades, fold.equity)), 6)}

    return {"from": fold.start.isoformat(), "to": fold.end.isoformat(), "active": side(fold.active),
            "candidate": side(fold.candidate), "run_ids": fold.run_ids}


def promotion_decide(*, folds: list[FoldResult], min_trades: int | None = None, probability: float | None = None,
                     drawdown_margin: Decimal | None = None) -> tuple[str, str, dict[str, Any]]:
    """Pure rule over the folds: (verdict, reason, test figures)."""
    min_trades = settings.PLAYBOOK_VALIDATION_MIN_TRADES if min_trades is None else min_trades
    probability = settings.PLAYBOOK_PROMOTION_PROBABILITY if probability is None else probability
    margin = settings.PLAYBOOK_MAX_DRAWDOWN_MARGIN if drawdown_margin is None else drawdown_margin
    trades = sum(len(f.active) + len(f.candidate) for f in folds)
    diffs = daily_differences(folds)
    p_better = bootstrap_better(diffs)
    test = {"method": "paired bootstrap over per-day returns", "days": int(diffs.size), "samples": BOOTSTRAP_SAMPLES,
            "mean_daily_difference": float(diffs.mean()) if diffs.size else 0.0, "p_candidate_better": round(p_better, 4),
            "threshold": probability, "closed_trades": trades, "min_trades": min_trades, "drawdown_margin": str(margin)}
    if not folds:
        return Verdict.WAITING, "not enough evidence: no validation fold fits in the market data outside the evidence window", test
    if trades < min_trades:
        return (Verdict.WAITING, f"not enough evidence: {trades} closed trades in {len(folds)} out-of-sample folds "
                f"(both versions), at least {min_trades} needed", test)
    for i, fold in enumerate(folds, 1):
        act, cand = _drawdown(fold.active, fold.equity), _drawdown(fold.candidate, fold.equity)
        if cand > act + margin:
            return (Verdict.REJECTED, f"fold {i} ({fold.start:%Y-%m-%d}..{fold.end:%Y-%m-%d}): max drawdown {cand:.2%} vs "
                    f"{act:.2%}, worse by more than the margin {margin:.2%}", test)
    if not np.any(diffs):
        return Verdict.REJECTED, f"tie: the candidate made the same returns as the active version on all {diffs.size} days; a tie never promotes", test
    if p_better > probability:
        return (Verdict.PROMOTED, f"better out of sample: P(candidate better) {p_better:.3f} > {probability} over {diffs.size} days, "
                f"{trades} closed trades, {len(folds)} folds", test)
    return (Verdict.REJECTED, f"not better out of sample: P(candidate better) {p_better:.3f} <= {probability} over {diffs.size} days, "
            f"{trades} closed trades, {len(folds)} folds", test)


def folds_place(*, data_start: datetime, data_end: datetime, days: int, count: int,
                evidence: tuple[datetime, datetime] | None) -> list[tuple[datetime, datetime]]:
    """`count` folds of days/count each, newest first from the data's end, never overlapping the evidence window."""
    length = timedelta(days=days) / count
    earliest = data_start + FOLD_WARMUP
    folds: list[tuple[datetime, datetime]] = []
    end = data_end
    while len(folds) < count:
        start = end - length
        if start < earliest:
            break
        if evidence is not None and start < evidence[1] and end > evidence[0]:
            end = min(end, evidence[0])  # jump before the evidence
            continue
        folds.append((start, end))
        end = start
    return sorted(folds)


def market_now(*, inst_ids: list[str]) -> datetime:
    """The market's own "now": the newest stored candle, else wall time (a replayed clock is not the wall clock)."""
    from market.models import Candle

    latest = Candle.objects.filter(instrument__inst_id__in=inst_ids).aggregate(m=Max("ts"))["m"]
    return min(latest, timezone.now()) if latest else timezone.now()


def validation_instruments() -> list[str]:
    """Every enabled instrument the bot trades (settings.INSTRUMENTS when none is enabled yet)."""
    from market.models import Instrument

    enabled = list(Instrument.objects.filter(trading_enabled=True).order_by("inst_id").values_list("inst_id", flat=True))
    return enabled or list(settings.INSTRUMENTS)


def validation_feed(*, inst_ids: list[str]) -> tuple[MarketFeed | None, str, tuple[datetime, datetime] | None]:
    """(feed, source, stored range): the stored candles; the synthetic market only when the bot trades it."""
    from market.feeds.replay import ReplayFeed
    from market.models import Candle

    if settings.MARKET_DATA_SOURCE == "synthetic":
        from market.feeds import synthetic_feed_from_settings

        return synthetic_feed_from_settings(), "synthetic", None
    span = Candle.objects.filter(instrument__inst_id__in=inst_ids).aggregate(lo=Min("ts"), hi=Max("ts"))
    if span["lo"] is None:
        return None, "database", None
    feed = ReplayFeed.from_db(inst_ids=inst_ids, timeframes=["5m", *settings.TIMEFRAMES], since=span["lo"], until=span["hi"])
    return feed, "database", (span["lo"], span["hi"])


def _closed(run_id: str) -> list[tuple[Decimal, datetime]]:
    rows = Trade.objects.filter(mode=Mode.REPLAY, run_id=run_id, status=TradeStatus.CLOSED, pnl_usd__isnull=False)
    return [(t.pnl_usd, t.closed_at or t.opened_at) for t in rows.only("pnl_usd", "closed_at", "opened_at")]


def _replay_fold(*, fold: FoldResult, versions: dict[str, int], inst_ids: list[str], feed: MarketFeed, cycle: timedelta) -> None:
    from tradebot.replay import replay_run

    fold.equity = Decimal(settings.PAPER_START_BALANCE) * len(inst_ids)
    for side, version in versions.items():
        for inst_id in inst_ids:
            run_id = f"validate-{side[:4]}-v{version}-{uuid.uuid4().hex[:8]}"[:64]
            summary = replay_run(inst_id=inst_id, start=fold.start, end=fold.end, feed=feed, brain="rules", cycle=cycle,
                                 run_id=run_id, playbook_version=version)
            if summary.interrupted:  # Ctrl-C cut the fold short: a partial fold is never judged
                raise KeyboardInterrupt
            fold.run_ids[side].append(run_id)
            getattr(fold, side).extend(_closed(run_id))


def _evidence_window(candidate: PlaybookVersion) -> tuple[datetime, datetime] | None:
    ev = candidate.evidence or {}
    try:
        return datetime.fromisoformat(ev["from"]), datetime.fromisoformat(ev["to"])
    except (KeyError, TypeError, ValueError):
        return None


def analyst_is_claude(analyst: str | None = None) -> bool:
    """Whether the analyst that trades is (meant to be) Claude: BRAIN=claude even without a key, or auto with one."""
    if analyst is not None:
        return analyst == "claude"
    return settings.BRAIN == "claude" or brain_name_for_settings() == "claude"


def _current_of(candidate: PlaybookVersion, against: PlaybookVersion | None) -> PlaybookVersion:
    """What the candidate is judged against: the bot's active version, or (a replay's own candidate) the run's."""
    if candidate.run_id:
        from brain.playbook import playbook_run_active

        return playbook_run_active(run_id=candidate.run_id) or against or playbook_current()
    return playbook_current()


def playbook_candidate_validate(
    *,
    candidate_id: int,
    days: int | None = None,
    inst_ids: list[str] | None = None,
    feed: MarketFeed | None = None,
    end: datetime | None = None,
    cycle: timedelta = timedelta(minutes=5),
    folds: int | None = None,
    on_fold: Callable[[int, int], None] | None = None,
    against: PlaybookVersion | None = None,
    analyst: str | None = None,
    cycles_source: tuple[str, str] = (Mode.LIVE, ""),
) -> ValidationOutcome:
    """Validate the candidate (PlaybookVersion pk) out of sample against the active version; promote, reject or wait.

    `on_fold(done, total)` is called after each fold (progress; tests use it to act mid-validation).
    A replay's own candidate (`run_id`, replay --learn) is judged against that run's active version
    (`against`: the version the run started with, until it promoted one). `analyst` ("claude" or
    "rules"; default: the settings') says who reads the playbook; `cycles_source` (mode, run id) whose
    recorded analyst cycles Claude-aware validation re-decides.
    """
    for _attempt in range(MAX_REVALIDATIONS):
        outcome = _validate_once(candidate_id=candidate_id, days=days, inst_ids=inst_ids, feed=feed, end=end, cycle=cycle,
                                 folds=folds, on_fold=on_fold, against=against, analyst=analyst,
                                 cycles_source=cycles_source)
        if outcome is not None:
            return outcome
    candidate = PlaybookVersion.objects.get(pk=candidate_id)
    reason = f"the active version changed during each of {MAX_REVALIDATIONS} validations; the candidate waits"
    PlaybookVersion.objects.filter(pk=candidate_id).update(validation={**(candidate.validation or {}), "reason": reason,
                                                                       "verdict": Verdict.WAITING})
    return ValidationOutcome(candidate.version, _current_of(candidate, against).version, False, reason,
                             candidate.validation or {}, Verdict.WAITING)


def _validate_once(*, candidate_id: int, days: int | None, inst_ids: list[str] | None, feed: MarketFeed | None,
                   end: datetime | None, cycle: timedelta, folds: int | None,
                   on_fold: Callable[[int, int], None] | None, against: PlaybookVersion | None = None,
                   analyst: str | None = None,
                   cycles_source: tuple[str, str] = (Mode.LIVE, "")) -> ValidationOutcome | None:
    days = days or settings.PLAYBOOK_VALIDATION_DAYS
    count = folds or settings.PLAYBOOK_VALIDATION_FOLDS
    candidate = PlaybookVersion.objects.filter(pk=candidate_id).first()
    if candidate is None:
        raise ValidationError(f"playbook candidate {candidate_id} does not exist")
    if candidate.run_id and against is None:  # only that replay's learner judges it (against what the run trades)
        raise ValidationError(f"playbook v{candidate.version} was learned inside replay {candidate.run_id}: copy it into "
                              f"a candidate of the bot's own (`playbook rollback {candidate.version}`) to validate it")
    if candidate.status != PlaybookStatus.CANDIDATE:
        raise ValidationError(f"playbook v{candidate.version} is {candidate.status}, not a candidate")
    current = _current_of(candidate, against)
    inst_ids = inst_ids or validation_instruments()
    source = "given"
    if feed is None:
        feed, source, _span = validation_feed(inst_ids=inst_ids)
    changes = playbook_trading_changes(current.playbook, candidate.playbook)
    evidence = _evidence_window(candidate)
    claude = bool(changes) and analyst_is_claude(analyst)
    rules_read = any(c["read_by"] == "rules" for c in changes)
    placed: list[tuple[datetime, datetime]] = []
    # Nothing to replay for a candidate equal to the active version, nor (Claude the analyst) for a change
    # of text alone, which the rules brain does not read.
    if feed is not None and changes and (rules_read or not claude):
        ranges = [feed.data_range(i) for i in inst_ids]  # type: ignore[attr-defined]
        data_start, data_end = max(r[0] for r in ranges), min(r[1] for r in ranges)
        if end is not None:
            data_end = min(data_end, end)
        placed = folds_place(data_start=data_start, data_end=data_end, days=days, count=count, evidence=evidence)
    results = []
    for i, (start, stop) in enumerate(placed, 1):
        fold = FoldResult(start=start, end=stop)
        _replay_fold(fold=fold, versions={"active": current.version, "candidate": candidate.version}, inst_ids=inst_ids,
                     feed=feed, cycle=cycle)  # type: ignore[arg-type]
        results.append(fold)
        if on_fold is not None:
            on_fold(i, len(placed))
    verdict, reason, test = promotion_decide(folds=results)
    if feed is None:
        reason = "not enough evidence: no stored candles for " + ", ".join(inst_ids)
    if not changes:
        verdict, reason = Verdict.REJECTED, f"the trading content equals the active v{current.version}: nothing to promote"
    claude_figures: dict[str, Any] | None = None
    if claude and (verdict == Verdict.PROMOTED or not rules_read):
        from tradebot.validation_claude import claude_validate

        rules_said = (f"the rules folds say: {reason}" if rules_read else
                      "no rules folds: the candidate changes only text the model reads, which the rules brain does not read")
        judged = claude_validate(candidate=candidate, current=current, feed=feed, evidence=evidence,
                                 end=end or market_now(inst_ids=inst_ids), mode=cycles_source[0], run_id=cycles_source[1],
                                 inst_ids=inst_ids)
        claude_figures = {"verdict": judged.verdict, "reason": judged.reason, **judged.figures}
        verdict, reason = judged.verdict, f"{judged.reason}; {rules_said}"
    elif claude:
        reason = f"{reason}; the Claude re-decision was not run (the rules folds decide first)"
    figures = {
        "verdict": verdict,
        "promoted": verdict == Verdict.PROMOTED,
        "reason": reason,
        "test": test,
        "folds": [_fold_figures(f) for f in results],
        "window": {"folds": len(results), "folds_asked": count, "days": days, "inst_ids": inst_ids, "source": source,
                   "brain": "rules", "cycle_seconds": int(cycle.total_seconds()),
                   "evidence": None if evidence is None else [evidence[0].isoformat(), evidence[1].isoformat()]},
        "current": {"version": current.version},
        "candidate": {"version": candidate.version},
        "changes": [c["path"] for c in changes],
        "validated_at": timezone.now().isoformat(),
        "claude": claude_figures,
    }
    if verdict == Verdict.PROMOTED:
        if not playbook_promote(candidate=candidate, against=current.version, validation=figures):
            if PlaybookVersion.objects.filter(pk=candidate.pk, status=PlaybookStatus.CANDIDATE).exists():
                log.info("playbook_revalidate", candidate=candidate.version, validated_against=current.version,
                         active=playbook_current().version)
                return None  # the active version changed meanwhile: validate again against it
            raise ValidationError(f"playbook v{candidate.version} was decided meanwhile")
    elif verdict == Verdict.REJECTED:
        fresh = PlaybookVersion.objects.get(pk=candidate.pk)
        if fresh.status != PlaybookStatus.CANDIDATE:
            raise ValidationError(f"playbook v{fresh.version} was decided meanwhile ({fresh.status})")
        playbook_transition(version=fresh, to=PlaybookStatus.REJECTED, validation=figures)
        PlaybookVersion.objects.filter(pk=candidate.pk).update(validated_against=current.version)
    else:
        PlaybookVersion.objects.filter(pk=candidate.pk, status=PlaybookStatus.CANDIDATE).update(
            validation=figures, validated_against=current.version)
    kind = {Verdict.PROMOTED: "playbook_promoted", Verdict.REJECTED: "playbook_rejected", Verdict.WAITING: "playbook_waiting"}[verdict]
    event_record(kind=kind, level="info" if verdict == Verdict.PROMOTED else "warning",
                 message=f"playbook v{candidate.version} {verdict} (against v{current.version}): {reason}",
                 data={"candidate": candidate.version, "current": current.version, "verdict": verdict,
                       "run_id": candidate.run_id},
                 mode=Mode.REPLAY if candidate.run_id else Mode.LIVE)
    return ValidationOutcome(candidate_version=candidate.version, current_version=current.version,
                             promoted=verdict == Verdict.PROMOTED, reason=reason, figures=figures, verdict=verdict)


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
        result["validation"] = {"promoted": validation.promoted, "verdict": validation.verdict, "reason": validation.reason,
                                "figures": validation.figures}
    return result
