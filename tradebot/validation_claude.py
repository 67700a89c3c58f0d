"""Claude-aware validation: recorded cycles decided again with the candidate playbook (issue 15, item 3).

When the analyst is Claude, a rules replay cannot judge what the model reads (entry and exit text,
filters, lessons, and the parameters as the model reads them). `claude_validate` judges such a
candidate by re-deciding:

1. It takes PLAYBOOK_CLAUDE_VALIDATION_CYCLES recorded cycles (newest first) where the analyst was
   called and answered (an `analyze` LlmCall that ended ok), whose full snapshot and analyst inputs
   (`Cycle.brain_context`) are stored, flat on their instrument (the decision judged is whether and how
   to open), and whose simulation window [as_of, as_of + horizon] lies before `end` (nothing after the
   validation's own time is read) and outside the candidate's evidence window.
2. Each cycle's analyst prompt is rebuilt from that record with the candidate playbook
   (`brain.prompts.analyst_prompt_rebuild`: for an unchanged playbook it is byte-equal to the prompt the
   cycle sent). The active version's decision is the recorded one where the active version made it,
   and is asked again otherwise.
3. Before the first call the cost of every call it will make is estimated (prompt characters in the
   model's tokens at the full input price, no cache discount; output at the mean of the recorded
   analyst calls' output tokens, else the call's max_tokens) and the validation is refused, with no
   call made, when the day's spending plus the estimate would pass LLM_DAILY_BUDGET_USD (on each
   budget day the calls count in: the wall clock live, a replay's virtual days).
4. The calls go through the gateway (`brain.llm.llm_call_structured`, purpose `validation`): each attempt
   an LlmCall row written before the request, on the re-decided cycle. A call that fails leaves that
   cycle out of the comparison (said in the figures); it never counts as a HOLD.
5. Each decision is simulated alone on a fresh paper account (PAPER_START_BALANCE) with the paper
   exchange itself: the risk gate sizes and approves it as it would live (no other position open), the
   market order fills at the last bar's close with slippage and the taker fee, then every stored base bar
   after the cycle is walked (funding at 00/08/16 UTC from the feed's rate, SL/TP, liquidation) until the
   position closes or PLAYBOOK_CLAUDE_VALIDATION_HORIZON_HOURS pass (closed there at market). The result
   is the account's equity change; the scratch account is deleted afterwards.
6. The verdict compares the two versions cycle by cycle: at least PLAYBOOK_CLAUDE_VALIDATION_MIN_TRADES
   simulated trades (both versions) or it waits ("not enough evidence"); a paired bootstrap over the
   per-cycle returns must give P(candidate better) above PLAYBOOK_PROMOTION_PROBABILITY; a tie never
   promotes; the drawdown of the cycle-by-cycle results may not be worse than the margin.
"""
from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Subquery
from django.utils import timezone

from brain.models import PlaybookVersion
from brain.schemas import Action, Decision, ResearchResult
from journal.models import Cycle, LlmCall, LlmCallStatus, Mode
from market.models import Instrument
from market.schemas import MarketSnapshot
from tradebot.logging import get_logger

log = get_logger(__name__)
PURPOSE = "validation"
OPENING = (Action.OPEN_LONG, Action.OPEN_SHORT)
NO_KEY_REASON = ("the analyst is Claude and the candidate changes what the model reads, but ANTHROPIC_API_KEY is "
                 "unset: it cannot be re-decided, so it is not promoted automatically (a person may force it)")


@dataclass
class ClaudeOutcome:
    verdict: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    calls: int = 0


@dataclass
class _Recorded:
    cycle: Cycle
    snapshot: MarketSnapshot
    research: ResearchResult | None
    output_tokens: int  # of the recorded analyst call


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def cycles_pick(*, count: int, end: datetime, horizon: timedelta, evidence: tuple[datetime, datetime] | None,
                mode: str = Mode.LIVE, run_id: str = "", inst_ids: list[str] | None = None) -> list[_Recorded]:
    """Up to `count` recorded analyst cycles (see the module docstring, 1.), newest first."""
    answered = LlmCall.objects.filter(purpose="analyze", status=LlmCallStatus.OK, cycle__isnull=False,
                                      cycle__mode=mode, cycle__run_id=run_id)
    rows = (Cycle.objects.filter(mode=mode, run_id=run_id, brain="claude", brain_context__isnull=False,
                                 decision__isnull=False, as_of__lte=end - horizon,
                                 pk__in=Subquery(answered.values("cycle_id")))
            .select_related("instrument").order_by("-as_of", "-id"))
    if inst_ids:
        rows = rows.filter(instrument__inst_id__in=inst_ids)
    if evidence is not None:  # the simulated window [as_of, as_of + horizon] never touches the evidence
        rows = rows.exclude(as_of__gt=evidence[0] - horizon, as_of__lt=evidence[1])
    picked: list[_Recorded] = []
    for cycle in rows.iterator(chunk_size=50):
        if not cycle.snapshot or cycle.snapshot.get("compact"):
            continue
        context = (cycle.brain_context or {}).get("context") or {}
        inst_id = cycle.instrument.inst_id
        if any(p.get("inst_id") == inst_id for p in context.get("positions") or []):
            continue  # a position open: the decision would act on it, which a fresh account cannot replay
        call = (LlmCall.objects.filter(cycle_id=cycle.pk, purpose="analyze", status=LlmCallStatus.OK)
                .order_by("-id").first())
        picked.append(_Recorded(cycle=cycle, snapshot=MarketSnapshot.model_validate(cycle.snapshot),
                                research=ResearchResult.model_validate(cycle.research) if cycle.research else None,
                                output_tokens=call.output_tokens if call is not None else 0))
        if len(picked) >= count:
            break
    return picked


def prompt_for(recorded: _Recorded, version: PlaybookVersion) -> Any:
    """The cycle's analyst prompt rebuilt with `version`'s playbook (brain.prompts.Prompt)."""
    from brain.prompts import analyst_prompt_rebuild

    return analyst_prompt_rebuild(snapshot=recorded.snapshot, inputs=recorded.cycle.brain_context or {},
                                  research=recorded.research, playbook=version.playbook,
                                  playbook_version=version.version)


def _spec() -> Any:
    from brain.claude import call_spec

    return replace(call_spec("analyze"), purpose=PURPOSE)


def _budget_day(cycle: Cycle) -> tuple[str, date]:
    """The budget day a call on this cycle counts in (brain.llm._budget_clock): a replay's virtual day, else today."""
    if cycle.mode == Mode.REPLAY and cycle.run_id:
        return cycle.run_id, cycle.as_of.date()
    return "", timezone.now().date()


def cost_estimate(*, plan: list[tuple[_Recorded, Any]], spec: Any) -> dict[str, Any]:
    """USD of the planned calls (module docstring, 3.), in total and per budget day."""
    from brain.budget import llm_cost
    from brain.llm import model_caps

    caps = model_caps(spec.model)
    recorded = [r.output_tokens for r, _ in plan if r.output_tokens]
    output = round(sum(recorded) / len(recorded)) if recorded else spec.max_tokens
    per_day: dict[tuple[str, date], Decimal] = defaultdict(Decimal)
    total_in = 0
    for rec, prompt in plan:
        tokens = int((sum(len(b) for b in prompt.static) + len(prompt.user)) * caps.tokens_per_char)
        total_in += tokens
        per_day[_budget_day(rec.cycle)] += llm_cost(model=spec.model, input_tokens=tokens, output_tokens=output)
    return {"calls": len(plan), "model": spec.model, "input_tokens": total_in, "output_tokens_per_call": output,
            "usd": sum(per_day.values(), Decimal(0)), "per_day": dict(per_day)}


def budget_refusal(estimate: dict[str, Any]) -> str | None:
    """Why the estimate may not be spent (None: it fits every budget day it counts in)."""
    from datetime import UTC, time

    from brain.budget import spent_today

    budget = settings.LLM_DAILY_BUDGET_USD
    for (run_id, day), usd in estimate["per_day"].items():
        spent = spent_today(now=datetime.combine(day, time(12), tzinfo=UTC), run_id=run_id)
        if spent + usd > budget:
            whose = f"replay {run_id} on {day}" if run_id else f"today ({day})"
            return (f"refused before any call: {estimate['calls']} calls estimated at ${usd:.4f} {whose}, with "
                    f"${spent:.4f} spent, would pass the daily budget of ${budget}")
    return None


def _ask(recorded: _Recorded, prompt: Any, spec: Any) -> tuple[Decision | None, dict[str, Any]]:
    """One validation call; (decision, what it did). A failed call gives no decision."""
    from brain.llm import llm_call_structured
    from brain.services import decision_bound

    cycle = recorded.cycle
    result = llm_call_structured(spec=spec, system_static=prompt.static, user=prompt.user, output_type=Decision,
                                 cycle_id=cycle.pk, mode=cycle.mode)
    info = {"source": "asked", "call_ids": result.call_ids, "status": result.status, "cost_usd": str(result.cost_usd)}
    if result.value is None:
        info["error"] = result.reason[:300]
        return None, info
    decision = result.value
    inst_id = cycle.instrument.inst_id
    if decision.decision.symbol != inst_id:
        return Decision.hold(inst_id, f"analyst answered for {decision.decision.symbol!r}"), info
    return decision_bound(decision, symbol=inst_id), info


def decision_simulate(*, decision: Decision, snapshot: MarketSnapshot, instrument: Instrument, feed: Any,
                      until: datetime) -> dict[str, Any]:
    """One decision alone on a fresh paper account, walked forward on the feed's bars until it closes or `until`."""
    from execution.exchanges.paper import PaperExchange
    from execution.models import PaperAccount
    from execution.risk import BotStateView, risk_check
    from execution.exchanges.base import AccountState, ExchangeRejected
    from tradebot.stages import market_ref

    out: dict[str, Any] = {"action": str(decision.action), "strategy": decision.strategy_used, "traded": False,
                           "pnl": "0"}
    if decision.action not in OPENING:
        return out
    equity = Decimal(settings.PAPER_START_BALANCE)
    verdict = risk_check(decision=decision, market=market_ref(snapshot),
                         account=AccountState(equity=equity, available_balance=equity), positions=[],
                         bot=BotStateView(), instrument=instrument, now=snapshot.ts)
    if not verdict.approved or verdict.approved_order is None:
        out["rejected"] = [rule for rule, _ in verdict.failures] or ["no order"]
        return out
    approved = verdict.approved_order
    inst_id = instrument.inst_id
    name = f"val-{uuid.uuid4().hex[:20]}"
    exchange = PaperExchange(account_name=name, start_balance=equity, exclusive=True)
    try:
        series = feed.series(inst_id, feed.timeframes(inst_id)[0])
        first = series.closed_end(_ms(snapshot.ts))
        if first == 0:
            out["rejected"] = ["no stored bar before the cycle"]
            return out
        exchange.process_bar(inst_id, series.bar(first - 1))  # the price the cycle's order fills at
        given: list[Decimal | None] = []  # the funding rate last given to the exchange (as the replay's walker does)

        def funding(at: datetime) -> None:
            feed.set_clock(at)
            rate = feed.funding_rate(inst_id).rate
            if not given or given[-1] != rate:
                exchange.set_funding_rate(inst_id, rate)
                given.append(rate)

        funding(snapshot.ts)
        try:
            exchange.set_leverage(inst_id=inst_id, leverage=approved.leverage, pos_side=approved.pos_side)
            placed = exchange.place_order(approved)
        except ExchangeRejected as exc:
            out["rejected"] = [f"exchange: {exc}"[:200]]
            return out
        out.update(traded=True, side=approved.pos_side, size=str(approved.size), entry=str(placed.avg_px))
        last = series.closed_end(_ms(until))
        step = timedelta(milliseconds=series.tf_ms)
        exit_reason = "horizon"
        for i in range(first, last):
            bar = series.bar(i)
            funding(bar.ts + step)
            exchange.process_bar(inst_id, bar)
            if not exchange.exposed():
                exit_reason = ""
                break
        if exchange.exposed():
            exchange.close_position(inst_id=inst_id, pos_side=approved.pos_side)
        closed = exchange.closed_positions()
        if closed:
            out.update(exit=exit_reason or closed[-1].close_reason, closed_at=closed[-1].closed_at.isoformat(),
                       exit_px=str(closed[-1].close_avg_px), fees=str(closed[-1].fee), funding=str(closed[-1].funding))
        out["pnl"] = str((exchange.account().equity - equity).quantize(Decimal("0.0001")))
    finally:
        PaperAccount.objects.filter(name=name).delete()  # scratch: cascades to its orders, positions, fills
    return out


def _compare(rows: list[dict[str, Any]], equity: Decimal, *, min_trades: int, probability: float,
             margin: Decimal) -> tuple[str, str, dict[str, Any]]:
    from tradebot.learning import Verdict, _drawdown, bootstrap_better

    import numpy as np

    pairs = [(Decimal(r["active"]["pnl"]), Decimal(r["candidate"]["pnl"]), datetime.fromisoformat(r["as_of"]))
             for r in rows]
    diffs = np.asarray([float((c - a) / equity) for a, c, _ in pairs], dtype=float)
    trades = sum(int(r["active"].get("traded", False)) + int(r["candidate"].get("traded", False)) for r in rows)
    p_better = bootstrap_better(diffs)
    act = [(a, t) for a, _, t in pairs]
    cand = [(c, t) for _, c, t in pairs]
    test = {"method": "paired bootstrap over per-cycle returns", "cycles": len(rows), "simulated_trades": trades,
            "min_trades": min_trades, "p_candidate_better": round(p_better, 4), "threshold": probability,
            "mean_cycle_difference": float(diffs.mean()) if diffs.size else 0.0,
            "active_pnl": str(sum((a for a, _, _ in pairs), Decimal(0))),
            "candidate_pnl": str(sum((c for _, c, _ in pairs), Decimal(0))),
            "active_max_drawdown_pct": round(float(_drawdown(act, equity)), 6),
            "candidate_max_drawdown_pct": round(float(_drawdown(cand, equity)), 6)}
    if not rows:
        return Verdict.WAITING, "not enough evidence: no recorded analyst cycle could be re-decided", test
    if trades < min_trades:
        return (Verdict.WAITING, f"not enough evidence: {trades} simulated trades over {len(rows)} re-decided cycles "
                f"(both versions), at least {min_trades} needed", test)
    if not np.any(diffs):
        return (Verdict.REJECTED, f"tie: the same result on all {len(rows)} re-decided cycles; a tie never promotes",
                test)
    if test["candidate_max_drawdown_pct"] > test["active_max_drawdown_pct"] + float(margin):
        return (Verdict.REJECTED, f"drawdown over the re-decided cycles {test['candidate_max_drawdown_pct']:.2%} vs "
                f"{test['active_max_drawdown_pct']:.2%}, worse by more than the margin {margin:.2%}", test)
    if p_better > probability:
        return (Verdict.PROMOTED, f"better on re-decided cycles: P(candidate better) {p_better:.3f} > {probability} "
                f"over {len(rows)} cycles, {trades} simulated trades", test)
    return (Verdict.REJECTED, f"not better on re-decided cycles: P(candidate better) {p_better:.3f} <= {probability} "
            f"over {len(rows)} cycles, {trades} simulated trades", test)


def claude_validate(*, candidate: PlaybookVersion, current: PlaybookVersion, feed: Any, end: datetime,
                    evidence: tuple[datetime, datetime] | None, mode: str = Mode.LIVE, run_id: str = "",
                    inst_ids: list[str] | None = None, count: int | None = None) -> ClaudeOutcome:
    """Judge `candidate` against `current` by re-deciding recorded cycles (the module docstring)."""
    from tradebot.learning import Verdict

    count = count or settings.PLAYBOOK_CLAUDE_VALIDATION_CYCLES
    horizon = timedelta(hours=settings.PLAYBOOK_CLAUDE_VALIDATION_HORIZON_HOURS)
    window = {"cycles_asked": count, "horizon_hours": settings.PLAYBOOK_CLAUDE_VALIDATION_HORIZON_HOURS,
              "mode": mode, "run_id": run_id, "until": end.isoformat()}
    if not settings.ANTHROPIC_API_KEY:
        return ClaudeOutcome(Verdict.WAITING, NO_KEY_REASON, {"window": window})
    if feed is None:
        return ClaudeOutcome(Verdict.WAITING, "not enough evidence: no stored candles to simulate decisions on",
                             {"window": window})
    picked = cycles_pick(count=count, end=end, horizon=horizon, evidence=evidence, mode=mode, run_id=run_id,
                         inst_ids=inst_ids)
    spec = _spec()
    plan: list[tuple[_Recorded, Any]] = []  # every call to make, before the first is made
    sides: list[tuple[_Recorded, Any, Any]] = []  # (recorded, candidate prompt, active prompt or None: recorded)
    for rec in picked:
        cand = prompt_for(rec, candidate)
        plan.append((rec, cand))
        recorded_by_active = rec.cycle.playbook_version == current.version
        act = None if recorded_by_active else prompt_for(rec, current)
        if act is not None:
            plan.append((rec, act))
        sides.append((rec, cand, act))
    estimate = cost_estimate(plan=plan, spec=spec)
    figures: dict[str, Any] = {
        "window": {**window, "cycles": len(picked)},
        "estimate": {k: (str(v) if isinstance(v, Decimal) else v) for k, v in estimate.items() if k != "per_day"},
    }
    refusal = budget_refusal(estimate)
    if refusal is not None:
        log.warning("claude_validation_refused", candidate=candidate.version, estimate_usd=str(estimate["usd"]))
        return ClaudeOutcome(Verdict.WAITING, refusal, figures)
    rows: list[dict[str, Any]] = []
    left_out: list[dict[str, Any]] = []
    calls = 0
    for rec, cand_prompt, act_prompt in sides:
        cycle = rec.cycle
        stop = min(cycle.as_of + horizon, end)
        if act_prompt is None:
            active_decision: Decision | None = Decision.model_validate(cycle.decision)
            active_info: dict[str, Any] = {"source": "recorded", "call_ids": []}
        else:
            active_decision, active_info = _ask(rec, act_prompt, spec)
            calls += len(active_info["call_ids"])
        cand_decision, cand_info = _ask(rec, cand_prompt, spec)
        calls += len(cand_info["call_ids"])
        if active_decision is None or cand_decision is None:
            left_out.append({"cycle_id": cycle.pk, "as_of": cycle.as_of.isoformat(),
                             "why": "a validation call failed", "active": active_info, "candidate": cand_info})
            continue
        row = {"cycle_id": cycle.pk, "as_of": cycle.as_of.isoformat(), "inst_id": cycle.instrument.inst_id}
        for side, decision, info in (("active", active_decision, active_info), ("candidate", cand_decision, cand_info)):
            sim = decision_simulate(decision=decision, snapshot=rec.snapshot, instrument=cycle.instrument, feed=feed,
                                    until=stop)
            row[side] = {**info, **sim}
        rows.append(row)
    equity = Decimal(settings.PAPER_START_BALANCE)
    verdict, reason, test = _compare(rows, equity, min_trades=settings.PLAYBOOK_CLAUDE_VALIDATION_MIN_TRADES,
                                     probability=settings.PLAYBOOK_PROMOTION_PROBABILITY,
                                     margin=settings.PLAYBOOK_MAX_DRAWDOWN_MARGIN)
    ids = [i for r in [*rows, *left_out] for s in ("active", "candidate") for i in r[s].get("call_ids", [])]
    spent = sum(LlmCall.objects.filter(pk__in=ids).values_list("cost_usd", flat=True), Decimal(0))
    figures.update(test=test, cycles=rows, left_out=left_out, calls=calls, spent_usd=str(spent))
    return ClaudeOutcome(verdict, reason, figures, calls)
