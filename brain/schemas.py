"""What a brain returns: the screen result and the trading decision.

Field names follow the seed (`OpusDecision`: analysis, decision, confidence,
strategy_used, reasoning). Numbers are plain floats here because that is what
a model writes; they are data, not trusted: the risk gate converts them to
Decimal and rejects NaN, infinities and absurd values with a reason. `HOLD` is
the safe default every failure path returns.
"""
from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Action(StrEnum):
    OPEN_LONG = "OPEN_LONG"
    OPEN_SHORT = "OPEN_SHORT"
    CLOSE = "CLOSE"
    ADD = "ADD"
    REDUCE = "REDUCE"
    HOLD = "HOLD"


OPENING_ACTIONS = frozenset({Action.OPEN_LONG, Action.OPEN_SHORT, Action.ADD})
ALWAYS_ALLOWED_ACTIONS = frozenset({Action.HOLD, Action.CLOSE, Action.REDUCE})


class ScreenResult(BaseModel):
    """The screener's verdict: is there a setup worth the analyst's time?"""

    model_config = ConfigDict(frozen=True)

    signal: bool
    reason: str = Field(max_length=2000)


class PositionCheck(BaseModel):
    """The screener model's answer to the position watch's routine check: is the analyst worth waking?"""

    model_config = ConfigDict(frozen=True)

    wake: bool
    reason: str = Field(max_length=2000)


class Analysis(BaseModel):
    model_config = ConfigDict(frozen=True)

    market_regime: str = ""
    bias: Literal["bullish", "bearish", "neutral"] = "neutral"
    key_observations: list[str] = Field(default_factory=list)
    risk_factors: list[str] = Field(default_factory=list)


class TradeDecision(BaseModel):
    """The order-shaped part of a decision (the seed's `Decision`).

    `size_pct` is the position's notional as a fraction of equity.
    `entry_price` is whatever the model claimed; the risk gate never uses it.
    """

    model_config = ConfigDict(frozen=True)

    action: Action
    symbol: str
    size_pct: float = 0.0
    order_type: Literal["market", "limit"] = "market"
    entry_price: float | None = None
    limit_price: float | None = None
    stop_loss: float | None = None
    take_profit: float | None = None
    leverage: float = 1.0


class Decision(BaseModel):
    """A brain's full answer for one cycle (the seed's `OpusDecision`)."""

    model_config = ConfigDict(frozen=True)

    analysis: Analysis = Field(default_factory=Analysis)
    decision: TradeDecision
    confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    strategy_used: str = ""
    reasoning: str = ""

    @property
    def action(self) -> Action:
        return self.decision.action

    @classmethod
    def hold(cls, symbol: str, reason: str) -> Decision:
        """The safe default: do nothing, and say why."""
        return cls(decision=TradeDecision(action=Action.HOLD, symbol=symbol), reasoning=reason)


# --- What a brain may see (frozen views; never ORM objects) -----------------
# The pipeline converts execution's and journal's objects into these, so the
# brain app never imports execution and a model never touches a live row.

Regime = Literal["trending_up", "trending_down", "volatile", "ranging", "unknown"]


class PositionView(BaseModel):
    model_config = ConfigDict(frozen=True)

    inst_id: str
    side: Literal["long", "short"]
    size: Decimal  # contracts
    notional_usd: Decimal
    entry_price: Decimal
    unrealized_pnl: Decimal = Decimal("0")
    leverage: Decimal = Decimal("1")
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    opened_at: datetime | None = None
    strategy_used: str = ""  # lets the rules brain apply that strategy's exit


class AccountView(BaseModel):
    model_config = ConfigDict(frozen=True)

    equity: Decimal
    available_balance: Decimal
    day_start_equity: Decimal
    peak_equity: Decimal


class TradeView(BaseModel):
    """What a brain may see of a journal trade (open or closed)."""

    model_config = ConfigDict(frozen=True)

    id: int
    inst_id: str
    direction: Literal["LONG", "SHORT"]
    status: Literal["open", "closed", "cancelled"] = "closed"
    opened_at: datetime
    closed_at: datetime | None = None
    entry_price: Decimal
    exit_price: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    size_pct: Decimal | None = None
    leverage: Decimal = Decimal("1")
    pnl_usd: Decimal | None = None
    pnl_pct: Decimal | None = None
    fees_usd: Decimal = Decimal("0")
    strategy_used: str = ""
    confidence_at_entry: Decimal | None = None
    market_regime: str = ""
    exit_reason: str = ""
    reasoning: str = ""
    indicators_entry: dict | None = None
    indicators_exit: dict | None = None
    playbook_version: int | None = None
    research_context: dict | None = None  # the research the decision used (untrusted text)


class BrainContext(BaseModel):
    model_config = ConfigDict(frozen=True)

    positions: list[PositionView] = Field(default_factory=list)
    account: AccountView | None = None
    recent_trades: list[TradeView] = Field(default_factory=list)
    manual_trigger: bool = False
    now: datetime

    def positions_for(self, inst_id: str) -> list[PositionView]:
        return [p for p in self.positions if p.inst_id == inst_id]


# --- Reflection ---------------------------------------------------------------


class TradeReview(BaseModel):
    """The seed's post-trade review."""

    model_config = ConfigDict(frozen=True)

    outcome: Literal["win", "loss", "breakeven"]
    execution_quality: Literal["good", "acceptable", "poor"]
    entry_timing: Literal["early", "good", "late"]
    exit_timing: Literal["early", "good", "late"]
    what_went_right: list[str] = Field(default_factory=list)
    what_went_wrong: list[str] = Field(default_factory=list)
    lesson: str = ""
    should_update_playbook: bool = False
    playbook_suggestion: str | None = None


class PlaybookChange(BaseModel):
    """One change a reflection made, with the trades that justify it."""

    model_config = ConfigDict(frozen=True)

    path: str  # e.g. "strategy_definitions.momentum_breakout.params.enabled"
    old: str
    new: str
    reason: str
    evidence_trade_ids: list[int] = Field(default_factory=list)


class DeepReflection(BaseModel):
    """The seed's DeepReflectionResult: a new playbook and why."""

    model_config = ConfigDict(frozen=True)

    updated_playbook: dict  # validated by brain.playbook_schema.Playbook before it is saved
    pattern_insights: list[str] = Field(default_factory=list)
    bias_findings: list[str] = Field(default_factory=list)
    discipline_score: int = Field(default=0, ge=0, le=100)
    summary: str = ""
    changes: list[PlaybookChange] = Field(default_factory=list)
    trade_ids: list[int] = Field(default_factory=list)


class DeepReflectionAnswer(BaseModel):
    """What the model writes for a deep reflection.

    Structured outputs cannot express free-keyed objects (the SDK turns
    `dict[str, X]` into an empty closed object), so the playbook travels as
    JSON text and is validated against the playbook schema on arrival.
    """

    updated_playbook_json: str
    pattern_insights: list[str] = Field(default_factory=list)
    bias_findings: list[str] = Field(default_factory=list)
    discipline_score: int = Field(default=0, ge=0, le=100)
    summary: str = ""
    changes: list[PlaybookChange] = Field(default_factory=list)


# --- Research ---------------------------------------------------------------


class ResearchAnswer(BaseModel):
    """The JSON the research model is asked for (the seed's fields)."""

    summary: str
    sentiment: Literal["bullish", "bearish", "neutral"] = "neutral"
    impact_level: Literal["high", "medium", "low"] = "low"
    time_horizon: Literal["immediate", "short", "medium"] = "short"
    key_points: list[str] = Field(default_factory=list)
    trading_implication: str = ""
    confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    sources: list[str] = Field(default_factory=list)


class ResearchResult(ResearchAnswer):
    """A research answer plus where and when it came from. Untrusted text."""

    model_config = ConfigDict(frozen=True)

    query: str
    triggers: list[str] = Field(default_factory=list)
    as_of: datetime
    from_cache: bool = False
