"""The cycle's stages as plain functions: the Celery tasks and the replay loop both call these.

A stage takes a `CycleWork` (the Cycle row, in memory, plus the parsed objects
earlier stages produced) and a `StageEnv` (feed, exchange, mode), calls ONE
service of another app, stores the result on the cycle and says whether the
cycle goes on. A stage never saves the cycle: the task (live) or the replay
loop (bulk) does. A stage that ends the cycle calls `cycle_end` with the
outcome and the reason; nothing after it runs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings

from brain.schemas import Action, BrainContext, Decision, ResearchResult, TradeView
from journal.models import Cycle, CycleOutcome, CycleState, Mode, Trade, TradeStatus
from market.feeds.base import MarketFeed
from market.schemas import MarketSnapshot
from tradebot.brain_views import account_view, position_view, recent_trades
from tradebot.cycle import cycle_end, transition_check
from tradebot.logging import get_logger

log = get_logger(__name__)
S = CycleState
SYNC_CANDLES = 10
HALT_STATES = frozenset({"HALTED", "EMERGENCY_HALT", "COOLDOWN"})
# The Cycle fields the stages set (and cycle_end): what the task writes back after a stage and the
# replay writes per batch.
CYCLE_FIELDS = (
    "state", "outcome", "reason", "error", "ended_at", "stage_times", "snapshot", "screener_result", "research",
    "decision", "risk_verdict", "client_order_id", "order", "brain", "playbook_version", "brain_context",
)


@dataclass
class StageEnv:
    """What the stages run against. Live: built once per worker process. Replay: one per run."""

    feed: MarketFeed | None
    exchange: Any  # execution.exchanges.base.Exchange
    mode: str = Mode.LIVE
    run_id: str = ""
    brain_name: str | None = None
    # Replay passes a pure snapshot builder over precomputed indicators; live builds from the feed.
    snapshot_provider: Callable[[str, datetime], MarketSnapshot] | None = None
    sync_candles: bool = True
    # Replay keeps the recent trades in memory between trades instead of reading them every cycle.
    recent_trades_provider: Callable[[], list[TradeView]] | None = None
    # Replay: (account, open positions) as the brain sees them (balances plus the run's day-start/peak
    # equity), kept between the events that change them instead of reading the bot state every cycle.
    account_provider: Callable[[], tuple[Any, list[Any]]] | None = None
    # Replay: the run's bot state (execution.risk.BotStateView), kept between the events that change
    # it; live reads the row at each stage that needs it.
    bot_provider: Callable[[], Any] | None = None
    manual_trigger: bool = False
    brain: Any = None  # cached brain instance (replay: one per run)
    # Replay: the snapshot JSON and the screener log row are left to the caller, which saves them
    # in bulk and keeps the full snapshot only where it is worth it (tradebot/replay.py).
    defer_journal: bool = False
    # Replay: the analyst's last review per instrument (brain.watch.ReviewMark), kept in memory (the
    # batch's cycle rows are written at its end); live reads the journal instead (any worker may have run it).
    review_marks: dict[str, Any] = field(default_factory=dict)

    @property
    def scope(self) -> str:
        """The BotState row this environment trades under: the live bot, or this replay run."""
        from execution.selectors import bot_scope

        return bot_scope(mode=self.mode, run_id=self.run_id)


@dataclass
class CycleWork:
    """One cycle in flight: the row plus parsed values (parsed lazily from its JSON when a task resumes)."""

    cycle: Cycle
    _snapshot: MarketSnapshot | None = None
    _decision: Decision | None = None
    _research: ResearchResult | None = None
    context: BrainContext | None = None
    screen_proceed: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def inst_id(self) -> str:
        return self.cycle.instrument.inst_id

    @property
    def snapshot(self) -> MarketSnapshot:
        if self._snapshot is None:
            if not self.cycle.snapshot:
                raise ValueError(f"cycle {self.cycle.pk} has no snapshot")
            self._snapshot = MarketSnapshot.model_validate(self.cycle.snapshot)
        return self._snapshot

    @property
    def decision(self) -> Decision:
        if self._decision is None:
            if not self.cycle.decision:
                raise ValueError(f"cycle {self.cycle.pk} has no decision")
            self._decision = Decision.model_validate(self.cycle.decision)
        return self._decision

    @property
    def research(self) -> ResearchResult | None:
        if self._research is None and self.cycle.research:
            self._research = ResearchResult.model_validate(self.cycle.research)
        return self._research


def brain_context(work: CycleWork, env: StageEnv) -> BrainContext:
    """Positions, account and recent trades as frozen views (brain never sees execution's objects)."""
    from execution.selectors import account_and_positions

    if work.context is not None:
        return work.context
    trades = env.recent_trades_provider() if env.recent_trades_provider else recent_trades(mode=env.mode, run_id=env.run_id)
    strategies = {t.inst_id: t.strategy_used for t in trades if t.status == TradeStatus.OPEN}
    if env.account_provider is not None:
        account, open_positions = env.account_provider()
    else:
        # Live: the account is computed from the positions; one read gives both.
        account, open_positions = account_and_positions(exchange=env.exchange, scope=env.scope)
    positions = [position_view(p, strategies.get(p.inst_id, "")) for p in open_positions]
    work.context = BrainContext(
        positions=positions,
        account=account_view(account),
        recent_trades=trades,
        manual_trigger=env.manual_trigger or (work.cycle.stage_times or {}).get("trigger") == "manual",
        now=work.cycle.as_of,
    )
    return work.context


def chosen_brain(env: StageEnv, work: CycleWork | None = None) -> Any:
    """The brain this environment asks for (degrade mode included); None lets the service choose.

    Live: every cycle reads the active playbook (a reflection may have saved a new one), once:
    the brain SCREENING built is kept on `work` (and handed to ANALYZING with the context, see
    tradebot.tasks) and reused while it is still the brain to use (the budget is checked anew).
    """
    from brain.services import brain_in_use

    if env.mode != Mode.REPLAY:
        kept = work.extra.get("brain") if work is not None else None
        brain = brain_in_use(name=env.brain_name, reuse=kept)
        if work is not None and brain is not None:
            work.extra["brain"] = brain
        return brain
    if env.brain is None:
        env.brain = brain_in_use(name=env.brain_name, check_budget=False)  # the run's budget: brain.budget
    return env.brain


def _end(work: CycleWork, outcome: str, reason: str, now: datetime | None = None) -> bool:
    cycle_end(work.cycle, outcome=outcome, reason=reason, now=now)
    return False


# --- the stages -------------------------------------------------------------------


def collect(work: CycleWork, env: StageEnv) -> bool:
    """COLLECTING: refresh candles, build the snapshot (only bars closed by `as_of`), mark the paper exchange."""
    cycle = work.cycle
    inst_id = work.inst_id
    if env.snapshot_provider is not None:
        snapshot = env.snapshot_provider(inst_id, cycle.as_of)
    else:
        from market.services import candles_sync
        from market.snapshot import snapshot_build

        feed = env.feed
        if feed is None:
            raise ValueError("no market feed configured")
        if hasattr(feed, "set_clock"):
            feed.set_clock(cycle.as_of)  # virtual clock feeds (synthetic, replay): never a bar after as_of
        sync = env.sync_candles
        if sync and getattr(feed, "name", "") == "okx":
            # OKX live: what `manage.py stream_okx` keeps fresh is read locally, the rest over REST (issue 19).
            from market.streams.store_feed import stream_feed_for

            feed = stream_feed_for(rest=feed, instrument=cycle.instrument, as_of=cycle.as_of)
            cycle.stage_times.setdefault(S.COLLECTING, {})["sources"] = dict(feed.sources)
            sync = feed.sources["candles"] != "stream"
        if sync:
            # The latest bars only: the backfill filled history; a few bars cover a missed cycle or two.
            candles_sync(feed=feed, instrument=cycle.instrument, timeframes=list(settings.TIMEFRAMES), limit=SYNC_CANDLES)
        snapshot = snapshot_build(feed=feed, inst_id=inst_id, as_of=cycle.as_of)
    work._snapshot = snapshot
    if not env.defer_journal:
        cycle.snapshot = snapshot.as_jsonable()
    if hasattr(env.exchange, "set_price") and env.snapshot_provider is None:
        # The paper exchange fills market orders at the price the cycle saw.
        env.exchange.set_price(inst_id, snapshot.price, snapshot.ts)
    return True


def _llm_watch(brain: Any) -> bool:
    """The position watch and the unchanged skip (brain.watch) spare the LLM brain; the rules brain costs nothing."""
    return getattr(brain, "name", "") == "claude"


def last_review(work: CycleWork, env: StageEnv) -> Any:
    """The analyst's last review of this instrument before this cycle (brain.watch.ReviewMark or None)."""
    from brain.watch import review_mark_last

    if env.mode == Mode.REPLAY:
        return env.review_marks.get(work.inst_id)
    return review_mark_last(inst_id=work.inst_id, mode=env.mode, run_id=env.run_id, before=work.cycle.as_of)


def screen(work: CycleWork, env: StageEnv) -> bool:
    """SCREENING: bypass rules or the screener (or, with a position open, the position watch); no signal ends the cycle."""
    from brain.services import screening_run

    context = brain_context(work, env)
    brain = chosen_brain(env, work)
    watch = settings.POSITION_WATCH_ENABLED and _llm_watch(brain) and bool(context.positions_for(work.inst_id))
    outcome = screening_run(snapshot=work.snapshot, context=context, cycle_id=work.cycle.pk,
                            mode=env.mode, brain=brain, instrument=work.cycle.instrument,
                            defer_log=env.defer_journal, watch=watch,
                            last_review=last_review(work, env) if watch else None)
    work.screen_proceed = outcome.proceed
    if outcome.pending_log is not None:
        work.extra["screener_log"] = outcome.pending_log
    if outcome.review_mark is not None:  # a position check said no: counted (live reads it back from the cycle)
        env.review_marks[work.inst_id] = outcome.review_mark
    work.cycle.screener_result = {
        "proceed": outcome.proceed,
        "bypassed": outcome.bypassed,
        "reason": outcome.reason,
        "signal": None if outcome.screen is None else outcome.screen.signal,
        "screener_log_id": outcome.screener_log_id,
        **({"position_check": outcome.position_check} if outcome.position_check is not None else {}),
    }
    if not outcome.proceed:
        return _end(work, CycleOutcome.NO_SIGNAL, f"no signal: {outcome.reason}")
    return True


def research(work: CycleWork, env: StageEnv) -> bool:
    """RESEARCHING: the research service decides whether it is triggered (and records a skip)."""
    from brain.services import research_run

    result = research_run(snapshot=work.snapshot, cycle_id=work.cycle.pk, mode=env.mode, instrument=work.cycle.instrument)
    work._research = result
    work.cycle.research = None if result is None else result.model_dump(mode="json")
    if result is None:
        why = "a replay does not research a past market" if env.mode == Mode.REPLAY else "not triggered or unavailable"
        work.cycle.stage_times.setdefault(S.RESEARCHING, {})["skipped"] = why
    return True


def analyze(work: CycleWork, env: StageEnv) -> bool:
    """ANALYZING: the analyst (or the rules brain) returns a validated decision; HOLD ends the cycle."""
    from brain.services import decision_make, screener_feedback_apply, screener_feedback_record

    from brain.watch import analyst_unchanged_reason, review_mark

    brain = chosen_brain(env, work)
    context = brain_context(work, env)
    if (settings.ANALYST_SKIP_UNCHANGED and _llm_watch(brain) and not context.manual_trigger
            and not context.positions_for(work.inst_id)):
        skip = analyst_unchanged_reason(snapshot=work.snapshot, last=last_review(work, env), now=work.cycle.as_of)
        if skip:
            work.cycle.stage_times.setdefault(S.ANALYZING, {})["skipped"] = skip
            return _end(work, CycleOutcome.NO_SIGNAL, skip)
    decision = decision_make(
        snapshot=work.snapshot, context=context, research=work.research,
        cycle_id=work.cycle.pk, mode=env.mode, brain=brain,
    )
    env.review_marks[work.inst_id] = review_mark(work.snapshot, str(decision.action))
    inputs = getattr(brain, "last_inputs", None)
    if inputs is not None and inputs[0] == work.cycle.pk:
        # What the LLM analyst read besides the snapshot: Claude-aware validation rebuilds its prompt from it.
        work.cycle.brain_context = inputs[1]
    work._decision = decision
    work.cycle.brain = getattr(brain, "name", "") or ""
    work.cycle.playbook_version = getattr(brain, "playbook_version", None)
    work.cycle.decision = decision.model_dump(mode="json")
    log_id = (work.cycle.screener_result or {}).get("screener_log_id")
    if work.extra.get("screener_log") is not None:
        screener_feedback_apply(row=work.extra["screener_log"], action=str(decision.action))
    elif log_id:
        # SCREENING stored the row's id on the cycle: one UPDATE, no read.
        screener_feedback_record(log_id=int(log_id), action=str(decision.action))
    if decision.action == Action.HOLD:
        return _end(work, CycleOutcome.HOLD, f"HOLD: {decision.reasoning or 'no reason given'}"[:2000])
    return True


def _gate(work: CycleWork, env: StageEnv, *, bot: Any = None) -> Any:
    """Run the risk gate on the cycle's decision against fresh account state.

    execution's `risk_gate_run` wraps `risk_check` with its consequences: it
    refreshes the bot state, halts on daily loss / drawdown and records a
    rejection with every failed rule. `bot`: the bot state this stage has just
    read (for its halt check), used for the account's day-start/peak figures
    and the gate's refresh instead of reading the row twice more.
    """
    from execution.selectors import account_and_positions
    from execution.services import risk_gate_run
    from market.selectors import returns_1h

    account, positions = account_and_positions(exchange=env.exchange, scope=env.scope, bot=bot)
    others = sorted({p.inst_id for p in positions} | {work.inst_id})
    returns = returns_1h(inst_ids=others, until=work.cycle.as_of, hours=settings.CORRELATION_LOOKBACK_HOURS) if len(others) > 1 else None
    return risk_gate_run(
        decision=work.decision,
        market=market_ref(work.snapshot),
        account=account,
        positions=positions,
        returns_1h=returns,
        instrument=work.cycle.instrument,
        cycle_id=work.cycle.pk,
        mode=env.mode,
        run_id=env.run_id,
        now=work.cycle.as_of,
        bot=bot,
    )


def market_ref(snapshot: MarketSnapshot) -> Any:
    """The market's own prices at the snapshot (never the model's)."""
    from execution.risk import MarketRef

    return MarketRef(last=snapshot.price, mark=snapshot.ticker.mark, inst_id=snapshot.inst_id, ts=snapshot.ts)


def bot_now(work: CycleWork, env: StageEnv) -> Any:
    """The bot state as this stage starts, with a HALTED/COOLDOWN whose time is up lifted first.

    Without the lift a cooldown (COOLDOWN_AFTER_LOSS_STREAK, 30 minutes) would hold
    until something else refreshed the row: the risk gate never runs while halted,
    so that was the 00:00 UTC reset. The lift writes only when it is due.
    """
    from execution.selectors import bot_state
    from execution.bot import bot_state_refresh

    current = env.bot_provider() if env.bot_provider is not None else bot_state(scope=env.scope)
    return bot_state_refresh(now=work.cycle.as_of, scope=env.scope, current=current)


def halted_reason(scope: str | None = None, *, bot: Any = None) -> str | None:
    """HALTED / EMERGENCY_HALT / COOLDOWN of `scope` (default: the live bot): why no order may go out, else None.

    `bot`: a bot state just read (`execution.selectors.bot_state`); else it is read here.
    """
    from execution.models import LIVE_SCOPE
    from execution.selectors import bot_state

    if bot is None:
        bot = bot_state(scope=scope or LIVE_SCOPE)
    if str(bot.state) in HALT_STATES:
        return f"bot {bot.state}: {bot.reason or 'no reason given'}"
    return None


def _verdict_json(verdict: Any) -> dict[str, Any]:
    return {
        "approved": bool(verdict.approved),
        "failures": [{"rule": rule, "reason": reason} for rule, reason in verdict.failures],
        "warnings": list(getattr(verdict, "warnings", []) or []),
    }


def risk(work: CycleWork, env: StageEnv) -> bool:
    """RISK_CHECK: bot-wide halt first, then the gate; a rejection is journaled with every failed rule."""
    bot = bot_now(work, env)  # read once: the halt check, the account figures and the gate's refresh
    reason = halted_reason(env.scope, bot=bot)
    if reason:
        return _end(work, CycleOutcome.HALTED, reason)
    verdict = _gate(work, env, bot=bot)
    work.cycle.risk_verdict = _verdict_json(verdict)
    if not verdict.approved:
        rules = ", ".join(rule for rule, _ in verdict.failures)
        return _end(work, CycleOutcome.REJECTED, f"risk gate rejected ({rules})")
    work.extra["approved"] = verdict.approved_order
    return True


def trade_context(work: CycleWork, env: StageEnv) -> dict[str, Any]:
    decision = work.decision
    snapshot = work.snapshot
    return {
        "strategy_used": decision.strategy_used,
        "confidence_at_entry": str(Decimal(str(decision.confidence)).quantize(Decimal("0.001"))),
        "market_regime": snapshot.regime,
        "reasoning": decision.reasoning,
        "indicators_entry": {tf: view.indicators.model_dump(mode="json") for tf, view in snapshot.timeframes.items()},
        "research_context": work.cycle.research,
        "playbook_version": work.cycle.playbook_version,
        "size_pct": str(decision.decision.size_pct),
        "mode": env.mode,
        "run_id": env.run_id,
    }


def execute(work: CycleWork, env: StageEnv) -> bool:
    """EXECUTING / CONFIRMING: halt check, the gate again on fresh state, one idempotent order.

    The gate runs again here (not only in RISK_CHECK) because only the gate can
    build an ApprovedOrder and it must not cross a broker as JSON, and because
    a halt or a fill between the stages must stop the order.
    """
    from execution.models import TERMINAL_ORDER_STATES, Order
    from execution.services import order_place

    # A task may be delivered again after its worker died; a replay's cycle runs once, in this loop.
    redelivery_possible = work.cycle.pk is not None and env.mode != Mode.REPLAY
    existing = Order.objects.filter(cycle_id=work.cycle.pk).order_by("id").first() if redelivery_possible else None
    if existing is not None and existing.state in TERMINAL_ORDER_STATES:
        # A previous delivery of this task finished the order before its worker died: never a second. If it died
        # between the fill's write and the trade's, the trade is journaled now from the exchange's fill (#16).
        from execution.sync import order_fill_journal

        order_fill_journal(order=existing, exchange=env.exchange)
        _order_record(work, existing)
        return True
    # An unfinished order of ours (the worker died mid-call) is completed below through
    # order_place, which looks it up by client order id before it would send anything.
    bot = bot_now(work, env)  # read once, here, at the start of this stage: a halt since RISK_CHECK stops it
    reason = None if existing is not None else halted_reason(env.scope, bot=bot)
    if reason:
        return _end(work, CycleOutcome.HALTED, reason)
    approved = work.extra.pop("approved", None)
    if approved is None:
        verdict = _gate(work, env, bot=bot)
        work.cycle.risk_verdict = _verdict_json(verdict)
        if not verdict.approved:
            rules = ", ".join(rule for rule, _ in verdict.failures)
            return _end(work, CycleOutcome.REJECTED, f"risk gate rejected at execution ({rules})")
        approved = verdict.approved_order
    order = order_place(approved=approved, cycle_id=work.cycle.pk, trade_context=trade_context(work, env), exchange=env.exchange,
                        instrument=work.cycle.instrument)
    # order_place returns the row as it left it; only a close's account sync can change it
    # afterwards (it settles orders not yet final), so only a close still open is read again.
    _order_record(work, order, fresh=approved.kind == "open" or order.state in TERMINAL_ORDER_STATES)
    return True


def _order_record(work: CycleWork, order: Any, *, fresh: bool = False) -> None:
    if not fresh:
        order.refresh_from_db()  # execution settles the fill on its own copy of the row
    work.cycle.client_order_id = order.client_order_id
    work.cycle.order = {
        "id": order.pk,
        "client_order_id": order.client_order_id,
        "state": str(order.state),
        "action": order.action,
        "size": str(order.size),
        "filled_size": str(order.filled_size),
        "avg_fill_price": None if order.avg_fill_price is None else str(order.avg_fill_price),
        "fee": str(order.fee),
        "error": order.error_message[:500],
    }
    transition_check(work.cycle.state, S.CONFIRMING)
    work.cycle.state = S.CONFIRMING


def journal(work: CycleWork, env: StageEnv) -> bool:
    """JOURNALING: link the trade to the cycle and close the cycle with its outcome."""
    cycle = work.cycle
    order = cycle.order or {}
    if cycle.client_order_id and cycle.pk is not None:
        Trade.objects.filter(client_order_id=cycle.client_order_id, cycle__isnull=True).update(cycle_id=cycle.pk)
    state = str(order.get("state", ""))
    if state in ("REJECTED", "CANCELED"):
        return _end(work, CycleOutcome.ERROR, f"order {cycle.client_order_id} {state}: {order.get('error', '')}")
    return _end(work, CycleOutcome.TRADED, f"{work.decision.action} {order.get('filled_size', '?')} @ {order.get('avg_fill_price')}")


# The pipeline, in order: (state, function, queue).
STAGES: tuple[tuple[str, Callable[[CycleWork, StageEnv], bool], str], ...] = (
    (S.COLLECTING, collect, "okx"),
    (S.SCREENING, screen, "llm"),
    (S.RESEARCHING, research, "llm"),
    (S.ANALYZING, analyze, "llm"),
    (S.RISK_CHECK, risk, "default"),
    (S.EXECUTING, execute, "orders"),  # its own worker: never behind COLLECTING or a model call
    (S.JOURNALING, journal, "default"),
)
STAGE_FUNCS = {state: fn for state, fn, _ in STAGES}
STAGE_QUEUES = {state: queue for state, _, queue in STAGES}


def stage_timed(work: CycleWork, env: StageEnv, stage: str) -> bool:
    """Run one stage and record its duration (the start was recorded by the claim)."""
    started = time.perf_counter()
    try:
        return STAGE_FUNCS[stage](work, env)
    finally:
        entry = work.cycle.stage_times.setdefault(stage, {})
        entry["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
