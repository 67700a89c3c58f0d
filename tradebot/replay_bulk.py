"""The bulk path of a replay (issue 21): the cycles whose result is already determined are written
without running the stage services.

Most replayed cycles cannot change anything: flat, with no bypass rule and no playbook setup (the
screener says "no signal"), or holding a position whose stop and take-profit are on the (paper)
exchange while no exit rule fires (the rules analyst says HOLD). What such a cycle journals is a
pure function of the precomputed indicator arrays (the history's `TimeframeSeries`) and of the
feed's price, funding and open interest at its time. The replay loop (tradebot/replay.py) still
walks the paper exchange through every bar, syncs the account after a close, starts the risk gate's
day at 00:00 UTC and tells the learner, exactly as before, for every cycle; then it asks
`BulkCycles.cycle`, which either writes the cycle's row and its screener log row (inserted with
the batch's other rows, in bulk) or answers None: the cycle can act (a setup, an exit signal, a
bypass, an anomaly, a news window), and the stages run it in full.

What the verdicts are made of is the very code the stages run: the rules brain's own `screen` and
`decide` on `MarketAt` (the snapshot's fields without the pydantic model: the same TimeframeViews,
price, regime, 1H change, funding, anomalies), memoised per state of the closed candles (a 15m
verdict serves three 5-minute cycles). Rows are field for field what the stages write
(tests/tradebot/test_replay_bulk.py replays 60 days of real OKX candles both ways and compares
every row); only the wall-clock fields differ (started/ended times, each stage's `duration_ms`,
which is 0.0 here: no stage ran).

With the Claude brain no cycle is bulk: its screener and analyst are the model (a no-signal is the
model's answer), so nothing it journals is known without a call. `per_cycle=True` on `replay_run`
(`manage.py replay --per-cycle`) turns the bulk path off.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from brain.schemas import Action, Decision
from journal.bulk import row_new
from journal.models import Cycle, CycleOutcome, CycleState, ScreenerLog, TradeStatus
from market.schemas import Anomalies
from tradebot.cycle import transition_check
from tradebot.logging import redact
from tradebot.replay_frames import FrameSnapshots
from tradebot.replay_state import RunState
from tradebot.brain_views import position_view
from tradebot.stages import StageEnv, chosen_brain

S = CycleState
_FOUR_HOURS = timedelta(hours=4)
_NO_RESEARCH = "a replay does not research a past market"  # tradebot.stages.research's reason in a replay


@dataclass(frozen=True)
class MarketAt:
    """The fields of the snapshot `FrameSnapshots` would build at `ts`, without the model: what the
    rules brain, the compact snapshot, the review mark and a stop's exit indicators read of it."""

    inst_id: str
    ts: datetime
    price: Decimal
    regime: str
    timeframes: dict[str, Any]  # tf -> market.schemas.TimeframeView: the very views the snapshot holds
    funding_rate: Decimal | None
    price_change_1h_pct: float | None
    anomalies: Anomalies


def market_at(snapshots: FrameSnapshots, as_of: datetime) -> MarketAt:
    """`snapshots(inst_id, as_of)` reduced to `MarketAt`: each field computed by the same functions
    `market.snapshot.snapshot_from_frames` uses, from the same feed calls."""
    from market.snapshot import anomalies_detect, price_change_1h

    feed, inst_id = snapshots.feed, snapshots.inst_id
    feed.set_clock(as_of)
    views = snapshots.views_at(as_of)
    light = getattr(feed, "last_price", None) is not None  # market.feeds.replay.ReplayFeed: the values alone
    price = feed.last_price(inst_id) if light else feed.ticker(inst_id).last
    change_1h = price_change_1h(price=price, candles=snapshots.frames, as_of=as_of, series=snapshots.series)
    if light:
        rate, oi_now = feed.funding_rate_value(inst_id), feed.open_interest_value(inst_id)
        has_oi = True  # the feed always answers (with None when it has no figure)
    else:
        funding = feed.funding_rate(inst_id)
        rate = funding.rate if funding is not None else None
        oi = feed.open_interest(inst_id)
        has_oi = oi is not None
        oi_now = oi.oi_contracts if oi is not None else None
    history = getattr(feed, "open_interest_at", None)
    oi_ago = history(inst_id, as_of - _FOUR_HOURS) if has_oi and callable(history) else None
    oi_change = float(oi_now / oi_ago - 1) if oi_now is not None and oi_ago is not None and oi_ago > 0 else None
    hourly = views.get("1H")
    return MarketAt(inst_id=inst_id, ts=as_of, price=price, regime=hourly.regime if hourly is not None else "unknown",
                    timeframes=views, funding_rate=rate, price_change_1h_pct=change_1h,
                    anomalies=anomalies_detect(price_change_1h_pct=change_1h, funding_rate=rate,
                                               oi_change_4h_pct=oi_change))


class _Holding:
    """The part of a BrainContext the rules brain's `decide` reads while a position is open here."""

    def __init__(self, position: Any) -> None:
        self.position = position
        self.positions = [position]

    def positions_for(self, inst_id: str) -> list[Any]:
        return [self.position] if self.position.inst_id == inst_id else []


class BulkCycles:
    """Per run: which cycles are determined, and their rows (see the module docstring)."""

    def __init__(self, *, snapshots: FrameSnapshots, full_snapshots: str) -> None:
        self.snapshots = snapshots
        self.full_snapshots = full_snapshots
        self.brain: Any = None  # the brain the memos were made with (replay --learn may promote another)
        self._screens: dict[tuple[int, ...], Any] = {}  # closed-candle counts -> the screener's ScreenResult
        self._manages: dict[tuple[Any, ...], Decision] = {}  # (counts, side, strategy) -> the analyst's decision
        self._dumps: dict[str, dict[str, Any]] = {}  # a HOLD's reasoning -> its decision JSON
        self._reasons: dict[str, str] = {}  # a cycle's reason -> as journaled (redacted, cut)
        self.bulk = 0  # cycles written here
        self.staged = 0  # cycles the stages ran

    def cycle(self, cycle: Cycle, env: StageEnv, run: RunState) -> tuple[MarketAt, ScreenerLog] | None:
        """Write the cycle's row (and return its market and screener log row) when its result is
        determined; None when the stages must run it (nothing about the cycle changed then)."""
        from brain.rules import RulesBrain

        if env.brain_name != "rules" or env.manual_trigger or (cycle.stage_times or {}).get("trigger") == "manual":
            self.staged += 1
            return None
        try:
            brain = chosen_brain(env)
            if not isinstance(brain, RulesBrain):
                self.staged += 1
                return None
            if brain is not self.brain:
                self.brain = brain
                self._screens.clear()
                self._manages.clear()
            market = market_at(self.snapshots, cycle.as_of)
            run.balances_now()  # the exchange's account and positions at this cycle's prices (run.account's)
            positions = run.positions
            here = [p for p in positions if p.inst_id == market.inst_id]
            verdict = self._hold_verdict(cycle, env, run, brain, market, here[0]) if here else \
                self._flat_verdict(cycle, env, brain, market)
        except Exception:  # noqa: BLE001 - the stages run it, and journal a failure as they do
            verdict = None
        if verdict is None:
            self.staged += 1
            return None
        self.bulk += 1
        if here:
            return market, self._hold_write(cycle, env, brain, market, verdict)
        return market, self._flat_write(cycle, env, brain, verdict)

    def _end(self, cycle: Cycle, outcome: str, reason: str) -> None:
        """`tradebot.cycle.cycle_end` (state DONE, no error), with the reason's redaction done once per text."""
        kept = self._reasons.get(reason)
        if kept is None:
            kept = self._reasons[reason] = redact(reason)[:4000]
        transition_check(cycle.state, S.DONE)
        cycle.state, cycle.outcome, cycle.reason, cycle.error = S.DONE, outcome, kept, ""
        cycle.ended_at = timezone.now()

    def _flat_verdict(self, cycle: Cycle, env: StageEnv, brain: Any, market: MarketAt) -> Any:
        """No position here: the screener's no-signal (a ScreenResult) when no bypass rule applies, else None."""
        from brain.news import news_event_near

        if not settings.SCREENER_ENABLED:
            return None
        if settings.SCREENER_BYPASS_ON_NEWS and news_event_near(now=cycle.as_of) is not None:
            return None
        move, funding = market.price_change_1h_pct, market.funding_rate
        if market.anomalies.move_1h or (move is not None and abs(move) > float(settings.ANOMALY_MOVE_1H_PCT)):
            return None
        if market.anomalies.funding_spike or (
                funding is not None and (funding > settings.FUNDING_SPIKE_HIGH or funding < settings.FUNDING_SPIKE_LOW)):
            return None
        key = self.snapshots.closed_counts()
        screen = self._screens.get(key)
        if screen is None:
            screen = self._screens[key] = brain.screen(snapshot=market, context=None, cycle_id=cycle.pk, mode=env.mode)
        return None if screen.signal else screen

    def _flat_write(self, cycle: Cycle, env: StageEnv, brain: Any, screen: Any) -> ScreenerLog:
        _started(cycle, (S.COLLECTING, S.SCREENING))
        cycle.screener_result = {"proceed": False, "bypassed": False, "reason": screen.reason, "signal": False,
                                 "screener_log_id": None}
        self._end(cycle, CycleOutcome.NO_SIGNAL, f"no signal: {screen.reason}")
        return row_new(ScreenerLog, instrument=cycle.instrument, cycle_id=cycle.pk, mode=env.mode, signal=False,
                       bypassed=False, bypass_reason="", reason=screen.reason, snapshot_json=None,
                       model=(getattr(brain, "name", "") or "")[:60], tokens_used=0, latency_ms=0, cost_usd=Decimal(0))

    def _hold_verdict(self, cycle: Cycle, env: StageEnv, run: RunState, brain: Any, market: MarketAt,
                      position: Any) -> Decision | None:
        """A position open here (the screener bypassed): the analyst's HOLD, else None."""
        if not settings.SCREENER_BYPASS_ON_POSITION or self.full_snapshots != "acted":
            return None  # "analyzed" keeps every analysed cycle's full snapshot: the stages build it
        strategies = {t.inst_id: t.strategy_used for t in run.recent_trades() if t.status == TradeStatus.OPEN}
        strategy = strategies.get(position.inst_id, "")
        side = "short" if position.pos_side == "short" else "long"
        key = (*self.snapshots.closed_counts(), side, strategy)
        decision = self._manages.get(key)
        if decision is None:
            held = _Holding(position_view(position, strategy))
            decision = self._manages[key] = brain.decide(snapshot=market, context=held, cycle_id=cycle.pk,
                                                         mode=env.mode)
        return decision if decision.action == Action.HOLD else None

    def _hold_write(self, cycle: Cycle, env: StageEnv, brain: Any, market: MarketAt, decision: Decision) -> ScreenerLog:
        from brain.watch import review_mark

        bypass = f"open position on {market.inst_id}"
        reason = f"bypassed: {bypass}"
        _started(cycle, (S.COLLECTING, S.SCREENING, S.RESEARCHING, S.ANALYZING), skipped={S.RESEARCHING: _NO_RESEARCH})
        cycle.screener_result = {"proceed": True, "bypassed": True, "reason": reason, "signal": None,
                                 "screener_log_id": None}
        cycle.research = None
        dump = self._dumps.get(decision.reasoning)
        if dump is None:
            dump = self._dumps[decision.reasoning] = decision.model_dump(mode="json")
        cycle.brain = getattr(brain, "name", "") or ""
        cycle.playbook_version = getattr(brain, "playbook_version", None)
        cycle.decision = dump
        env.review_marks[market.inst_id] = review_mark(market, str(decision.action))  # type: ignore[arg-type]
        self._end(cycle, CycleOutcome.HOLD, f"HOLD: {decision.reasoning or 'no reason given'}"[:2000])
        return row_new(ScreenerLog, instrument=cycle.instrument, cycle_id=cycle.pk, mode=env.mode, signal=True,
                       bypassed=True, bypass_reason=bypass[:200], reason=reason, snapshot_json=None, model="",
                       tokens_used=0, latency_ms=0, cost_usd=Decimal(0), analyst_action=str(decision.action)[:20],
                       analyst_agreed=None)


def _started(cycle: Cycle, stages: tuple[str, ...], skipped: dict[str, str] | None = None) -> None:
    """The stage marks the stages would have left (`tradebot.cycle.stage_started` on the replay's clock),
    each with a `duration_ms` of 0.0: none ran."""
    at = cycle.as_of.isoformat()
    cycle.started_at = timezone.now()
    times = cycle.stage_times
    for stage in stages:
        entry: dict[str, Any] = {"started": at}
        if skipped and stage in skipped:
            entry["skipped"] = skipped[stage]
        entry["duration_ms"] = 0.0
        times[str(stage)] = entry  # a plain str key, as tradebot.cycle.stage_started's
    cycle.state = stages[-1]
