"""What a brain returns: the screen result and the trading decision.

Field names follow the seed (`OpusDecision`: analysis, decision, confidence,
strategy_used, reasoning). Numbers are plain floats here because that is what
a model writes; they are data, not trusted: the risk gate converts them to
Decimal and rejects NaN, infinities and absurd values with a reason. `HOLD` is
the safe default every failure path returns.
"""
from __future__ import annotations

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
