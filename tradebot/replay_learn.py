"""Learning inside a replay: `manage.py replay ... --learn` (issue 15, item 7).

`replay_run(..., learn=ReplayLearner(...))` calls `after_cycle(as_of)` once each cycle has run. At the
virtual time t = as_of the learner does what the live bot does after trades close, on the replay's clock:
- a post-trade review (`brain.reflection.trade_review_run`, the replay's brain) of every trade the run
  closed since the last cycle;
- a deep reflection every REFLECTION_INTERVAL_TRADES closed trades or REFLECTION_INTERVAL_HOURS of the
  virtual clock since the last one (when there is a new closed trade to learn from), over the run's
  trades closed by t and not yet reflected on (`deep_reflection_run(until=t)`), starting from the version
  the run trades; a change of trading content is a candidate of the run's own (`PlaybookVersion.run_id`);
- its validation (`tradebot.learning.playbook_candidate_validate`) against the run's active version,
  with the folds placed on the replay's own market data before t (`end=t`: no fold reads a candle after
  t, and none overlaps the reflection's evidence), replayed with PLAYBOOK_VALIDATION_CYCLE_SECONDS cycles
  (as live validation) but never shorter than the replay's own, and (Claude
  the replay's analyst) the re-decision of the run's own recorded cycles before t. A promoted candidate
  is what the run trades from the next cycle on (compare-and-swap on the run's active version).
No lookahead: the reflection at t reads only trades closed by t, its validation only candles before t;
tests/tradebot/test_replay_learn.py changes the market after a time and sees the earlier versions unchanged.

The run's versions never touch the live bot: `playbook_current` is the bot's own active version, and a
replay's version becomes the bot's only as a new candidate (`playbook rollback N`) validated like any.
`report()` lists each version: when it was proposed (virtual time), its verdict, when it was promoted
and why. The LLM budget of a `--brain claude` replay counts the replay's virtual days (brain.budget).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings

from brain.models import PlaybookVersion
from journal.models import Mode, Trade, TradeStatus
from tradebot.logging import get_logger

log = get_logger(__name__)


@dataclass
class LearnEvent:
    """One version in a replay's history."""

    version: int
    proposed_at: datetime
    verdict: str  # "start" (what the run began with), promoted, rejected, waiting
    reason: str
    promoted_at: datetime | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)
    evidence: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "proposed_at": self.proposed_at.isoformat(), "verdict": self.verdict,
                "promoted_at": self.promoted_at.isoformat() if self.promoted_at else None, "reason": self.reason,
                "changes": [c["path"] for c in self.changes]}


@dataclass
class ReplayLearner:
    """The learning loop of one replay run (see the module docstring)."""

    feed: Any
    brain: str = "rules"
    cycle: timedelta = timedelta(minutes=5)  # the replay's; validation replays use max(this, the setting's)
    days: int | None = None  # validation days (default PLAYBOOK_VALIDATION_DAYS)
    folds: int | None = None  # validation folds (default PLAYBOOK_VALIDATION_FOLDS)
    events: list[LearnEvent] = field(default_factory=list)
    reviews: int = 0
    reflections: int = 0
    run_id: str = ""
    inst_id: str = ""
    _env: Any = None
    _active: PlaybookVersion | None = None
    _last_reflection: datetime | None = None
    _pending: int = 0  # closed trades reviewed and not yet reflected on
    _closes_seen: int = 0

    def begin(self, *, run_id: str, inst_id: str, env: Any, start: datetime) -> None:
        """Called by replay_run before the first cycle, with the run's stage environment."""
        from brain.playbook import playbook_current

        self.run_id, self.inst_id, self._env = run_id, inst_id, env
        version = getattr(env.brain, "playbook_version", None)
        pinned = PlaybookVersion.objects.filter(version=version).first() if version else None
        self._active = pinned or playbook_current()
        if env.brain is None or getattr(env.brain, "playbook_version", None) != self._active.version:
            self._trade(self._active)
        self._last_reflection = start
        self._closes_seen = env.exchange.closes
        self.events.append(LearnEvent(version=self._active.version, proposed_at=start, verdict="start",
                                      reason="the version the replay starts with", promoted_at=start))

    @property
    def active(self) -> PlaybookVersion:
        assert self._active is not None, "begin() first"
        return self._active

    def _trade(self, version: PlaybookVersion) -> None:
        """From the next cycle on the run trades `version` (the stages use the environment's brain)."""
        from brain.base import brain_for_settings

        self._env.brain = brain_for_settings(self.brain, playbook=version.playbook, playbook_version=version.version)

    def after_cycle(self, as_of: datetime) -> bool:
        """Reviews, then the deep reflection and its validation when due (cheap when nothing closed).

        True when it reviewed a trade (the run's trade rows changed)."""
        exchange = self._env.exchange
        reviewed = False
        if exchange.closes != self._closes_seen:
            self._closes_seen = exchange.closes
            reviewed = self._review(as_of)
        if not self._pending:
            return reviewed
        by_trades = self._pending >= settings.REFLECTION_INTERVAL_TRADES
        by_time = as_of - self._last_reflection >= timedelta(hours=settings.REFLECTION_INTERVAL_HOURS)
        if by_trades or by_time:
            self._reflect(as_of)
        return reviewed

    def _review(self, as_of: datetime) -> bool:
        from brain.reflection import trade_review_run

        closed = (Trade.objects.filter(mode=Mode.REPLAY, run_id=self.run_id, status=TradeStatus.CLOSED,
                                       pnl_usd__isnull=False, self_review__isnull=True, closed_at__lte=as_of)
                  .order_by("closed_at", "id").values_list("pk", flat=True))
        closed = list(closed)
        for trade_id in closed:
            trade_review_run(trade_id=trade_id, brain_name=self.brain)
            self.reviews += 1
            self._pending += 1
        return bool(closed)

    def _reflect(self, as_of: datetime) -> None:
        from brain.reflection import deep_reflection_run
        from tradebot.learning import playbook_candidate_validate

        self._last_reflection, self._pending = as_of, 0
        self.reflections += 1
        outcome = deep_reflection_run(now=as_of, force=True, mode=Mode.REPLAY, run_id=self.run_id,
                                      brain_name=self.brain, base=self.active, until=as_of, owner_run_id=self.run_id)
        if outcome.candidate_version is None:
            return
        candidate = PlaybookVersion.objects.get(version=outcome.candidate_version)
        result = playbook_candidate_validate(
            candidate_id=candidate.pk, feed=self.feed, end=as_of, inst_ids=[self.inst_id],
            cycle=max(self.cycle, timedelta(seconds=settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS)),
            days=self.days, folds=self.folds, against=self.active, analyst=self.brain,
            cycles_source=(Mode.REPLAY, self.run_id))
        candidate.refresh_from_db()
        event = LearnEvent(version=candidate.version, proposed_at=as_of, verdict=result.verdict, reason=result.reason,
                           changes=list(candidate.changes or []), evidence=candidate.evidence,
                           validation=result.figures)
        if result.promoted:
            event.promoted_at = as_of
            self._active = candidate
            self._trade(candidate)
        self.events.append(event)
        log.info("replay_learning", run_id=self.run_id, at=as_of.isoformat(), version=candidate.version,
                 verdict=result.verdict)

    def report(self) -> dict[str, Any]:
        """The run's learning: counts and each version (when proposed, verdict, when promoted, why)."""
        verdicts = [e.verdict for e in self.events[1:]]
        return {"reviews": self.reviews, "reflections": self.reflections, "candidates": len(verdicts),
                "promoted": verdicts.count("promoted"), "rejected": verdicts.count("rejected"),
                "waiting": verdicts.count("waiting"), "final_version": self.active.version,
                "versions": [e.as_dict() for e in self.events]}
