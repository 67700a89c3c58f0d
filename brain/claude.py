"""The Claude brain: Haiku screens, Opus analyses and reflects, via the gateway.

Every failure ends in the safe default with its reason: no signal for the
screener, HOLD for the analyst, the rules review for a post-trade review, and
"no change" for a deep reflection.
"""
from __future__ import annotations

import json

from django.conf import settings

from brain.llm import CallSpec, LlmResult, llm_call_structured, model_caps
from brain.playbook_schema import playbook_validate
from datetime import datetime

from brain.prompts import (
    DEEP_REFLECTION_SYSTEM, POSITION_CHECK_SYSTEM, POST_TRADE_SYSTEM, SCREENER_SYSTEM_PROMPT, Prompt, analyst_inputs,
    analyst_prompt, deep_reflection_prompt, position_check_prompt, post_trade_prompt, screener_prompt,
)
from brain.schemas import (
    BrainContext, DeepReflection, DeepReflectionAnswer, Decision, PositionCheck, PositionView, ResearchResult,
    ScreenResult, TradeReview, TradeView,
)
from brain.watch import ReviewMark
from market.schemas import MarketSnapshot

# Thinking tokens count against max_tokens: a thinking model needs room to think.
THINKING_MIN_MAX_TOKENS = 2048
POSITION_CHECK_MIN_MAX_TOKENS = 200


def call_spec(purpose: str) -> CallSpec:
    """Model and parameters for a purpose, from settings only (effort and thinking budget per purpose's model)."""
    budget = 0
    if purpose in ("screen", "position_check"):
        # The position check is the screener model's too; its answer's reason needs a little more room.
        model, max_tokens, timeout, temp, effort = (settings.SCREENER_MODEL, settings.SCREENER_MAX_TOKENS,
                                                    settings.SCREENER_TIMEOUT_SECONDS, settings.ANALYST_TEMPERATURE,
                                                    settings.SCREENER_EFFORT)
        if purpose == "position_check":
            max_tokens = max(max_tokens, POSITION_CHECK_MIN_MAX_TOKENS)
    elif purpose == "analyze":
        model, max_tokens, timeout, temp, effort = (settings.ANALYST_MODEL, settings.ANALYST_MAX_TOKENS,
                                                    settings.ANALYST_TIMEOUT_SECONDS, settings.ANALYST_TEMPERATURE,
                                                    settings.ANALYST_EFFORT)
        budget = settings.ANALYST_THINKING_BUDGET
    else:  # post_trade, deep_reflection
        model, max_tokens, timeout, temp, effort = (settings.REFLECTION_MODEL, settings.REFLECTION_MAX_TOKENS,
                                                    settings.REFLECTION_TIMEOUT_SECONDS, settings.REFLECTION_TEMPERATURE,
                                                    settings.REFLECTION_EFFORT)
        budget = settings.REFLECTION_THINKING_BUDGET
    caps = model_caps(model)
    if caps.adaptive_thinking:
        max_tokens = max(max_tokens, THINKING_MIN_MAX_TOKENS)
        budget = 0
    elif budget > 0:
        # The API needs max_tokens above the thinking budget, with room left for the answer.
        max_tokens = max(max_tokens, budget + 1024)
    return CallSpec(purpose=purpose, model=model, max_tokens=max_tokens, timeout=timeout, temperature=temp, effort=effort,
                    thinking_budget=budget)


class ClaudeBrain:
    name = "claude"

    def __init__(self, *, playbook: dict | None = None, playbook_version: int | None = None, client=None) -> None:
        if playbook is None:
            from brain.playbook import playbook_current

            current = playbook_current()
            playbook, playbook_version = current.playbook, current.version
        self.playbook = playbook
        self.playbook_version = playbook_version or 0
        self.client = client
        self.last_result: LlmResult | None = None  # usage of the last call, for the screener log
        self.last_prompt: Prompt | None = None
        # (cycle id, brain.prompts.analyst_inputs) of the last decision: the stage stores them on the cycle.
        self.last_inputs: tuple[int | None, dict] | None = None

    def screen(self, *, snapshot: MarketSnapshot, context: BrainContext, cycle_id: int | None = None, mode: str = "live") -> ScreenResult:
        result = llm_call_structured(spec=call_spec("screen"), system_static=[SCREENER_SYSTEM_PROMPT], user=screener_prompt(snapshot),
                                     output_type=ScreenResult, cycle_id=cycle_id, mode=mode, client=self.client)
        self.last_result = result
        if result.value is not None:
            return result.value
        return ScreenResult(signal=False, reason=f"screener {result.status}: {result.reason}"[:2000])

    def check_position(self, *, snapshot: MarketSnapshot, position: PositionView, last: ReviewMark, now: datetime,
                       cycle_id: int | None = None, mode: str = "live") -> PositionCheck:
        """The position watch's routine check on the screener model; a check without a valid answer wakes the analyst."""
        result = llm_call_structured(spec=call_spec("position_check"), system_static=[POSITION_CHECK_SYSTEM],
                                     user=position_check_prompt(snapshot=snapshot, position=position, last=last, now=now),
                                     output_type=PositionCheck, cycle_id=cycle_id, mode=mode, client=self.client)
        self.last_result = result
        if result.value is not None:
            return result.value
        return PositionCheck(wake=True, reason=f"position check {result.status}: {result.reason}"[:2000])

    def decide(self, *, snapshot: MarketSnapshot, context: BrainContext, research: ResearchResult | None = None,
               cycle_id: int | None = None, mode: str = "live") -> Decision:
        from brain.news import upcoming_events

        upcoming = upcoming_events(now=context.now, hours=24)
        prompt = analyst_prompt(snapshot=snapshot, context=context, research=research, playbook=self.playbook,
                                playbook_version=self.playbook_version, upcoming=upcoming)
        self.last_prompt = prompt
        self.last_inputs = (cycle_id, analyst_inputs(context=context, upcoming=upcoming))
        # The analyst's prefix is cached only when a read is plausible (brain.llm.cache_read_plausible).
        result = llm_call_structured(spec=call_spec("analyze"), system_static=prompt.static, user=prompt.user,
                                     output_type=Decision, cycle_id=cycle_id, mode=mode, client=self.client,
                                     cache_when="read_plausible")
        self.last_result = result
        decision = result.value
        if decision is None:
            return Decision.hold(snapshot.inst_id, f"analyst {result.status}: {result.reason}"[:2000])
        if decision.decision.symbol != snapshot.inst_id:
            return Decision.hold(snapshot.inst_id, f"analyst answered for {decision.decision.symbol!r}, not {snapshot.inst_id}")
        return decision

    def review_trade(self, *, trade: TradeView, cycle_id: int | None = None, mode: str = "live") -> TradeReview:
        result = llm_call_structured(spec=call_spec("post_trade"), system_static=[POST_TRADE_SYSTEM], user=post_trade_prompt(trade),
                                     output_type=TradeReview, cycle_id=cycle_id, mode=mode, client=self.client)
        self.last_result = result
        if result.value is not None:
            return result.value
        from brain.rules import RulesBrain

        review = RulesBrain(playbook=self.playbook, playbook_version=self.playbook_version).review_trade(trade=trade)
        return review.model_copy(update={"lesson": f"{review.lesson} (LLM review {result.status}: {result.reason[:200]})"})

    def reflect(self, *, trades: list[TradeView], playbook: dict | None = None, version: int | None = None,
                performance: dict | None = None, cycle_id: int | None = None, mode: str = "live") -> DeepReflection:
        playbook = playbook or self.playbook
        user = deep_reflection_prompt(trades=trades, playbook=playbook, version=version or self.playbook_version, performance=performance or {})
        result = llm_call_structured(spec=call_spec("deep_reflection"), system_static=[DEEP_REFLECTION_SYSTEM], user=user,
                                     output_type=DeepReflectionAnswer, cycle_id=cycle_id, mode=mode, client=self.client)
        self.last_result = result
        ids = [t.id for t in trades]
        answer = result.value
        if answer is None:
            return DeepReflection(updated_playbook=playbook, summary=f"no change: reflection {result.status}: {result.reason}"[:2000], trade_ids=ids)
        try:
            updated = playbook_validate(json.loads(answer.updated_playbook_json)).model_dump(mode="json")
        except ValueError as exc:
            return DeepReflection(updated_playbook=playbook, summary=f"no change: the proposed playbook is invalid: {str(exc)[:500]}",
                                  pattern_insights=answer.pattern_insights, bias_findings=answer.bias_findings,
                                  discipline_score=answer.discipline_score, trade_ids=ids)
        known = set(ids)
        changes = [c.model_copy(update={"evidence_trade_ids": [i for i in c.evidence_trade_ids if i in known]}) for c in answer.changes]
        return DeepReflection(updated_playbook=updated, pattern_insights=answer.pattern_insights, bias_findings=answer.bias_findings,
                              discipline_score=answer.discipline_score, summary=answer.summary, changes=changes, trade_ids=ids)
