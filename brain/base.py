"""The Brain interface and the choice of brain from settings."""
from __future__ import annotations

from typing import Protocol

from django.conf import settings

from brain.schemas import BrainContext, DeepReflection, Decision, ResearchResult, ScreenResult, TradeReview, TradeView
from market.schemas import MarketSnapshot
import structlog

log = structlog.get_logger(__name__)


class Brain(Protocol):
    name: str

    def screen(self, *, snapshot: MarketSnapshot, context: BrainContext, cycle_id: int | None = None, mode: str = "live") -> ScreenResult: ...

    def decide(self, *, snapshot: MarketSnapshot, context: BrainContext, research: ResearchResult | None = None,
               cycle_id: int | None = None, mode: str = "live") -> Decision: ...

    def review_trade(self, *, trade: TradeView, cycle_id: int | None = None, mode: str = "live") -> TradeReview: ...

    def reflect(self, *, trades: list[TradeView], playbook: dict | None = None, version: int | None = None,
                performance: dict | None = None, cycle_id: int | None = None, mode: str = "live") -> DeepReflection: ...


def brain_name_for_settings(name: str | None = None) -> str:
    """`claude` or `rules`: auto means Claude when ANTHROPIC_API_KEY is set."""
    choice = name or settings.BRAIN
    if choice == "auto":
        return "claude" if settings.ANTHROPIC_API_KEY else "rules"
    if choice == "claude" and not settings.ANTHROPIC_API_KEY:
        log.warning("brain_claude_without_key", note="BRAIN=claude but ANTHROPIC_API_KEY is unset: using the rules brain")
        return "rules"
    if choice not in ("claude", "rules"):
        raise ValueError(f"unknown brain {choice!r}: use auto, claude or rules")
    return choice


def brain_for_settings(name: str | None = None, *, playbook: dict | None = None, playbook_version: int | None = None) -> Brain:
    """The brain to use (current playbook unless one is given)."""
    # Imported here, and Claude's only when chosen: the anthropic SDK costs ~2 s
    # to import, which a rules-brain worker or replay should not pay.
    if brain_name_for_settings(name) == "claude":
        from brain.claude import ClaudeBrain

        return ClaudeBrain(playbook=playbook, playbook_version=playbook_version)
    from brain.rules import RulesBrain

    return RulesBrain(playbook=playbook, playbook_version=playbook_version)
