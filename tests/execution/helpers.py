"""Builders for execution tests: decisions, instrument specs and gate-approved orders."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from brain.schemas import Action, Decision, TradeDecision
from execution.exchanges.base import AccountState, Position
from execution.risk import ApprovedOrder, BotStateView, MarketRef, risk_check
from market.feeds.base import InstrumentSpec

BTC = "BTC-USDT-SWAP"
T0 = datetime(2026, 1, 1, 7, 0, tzinfo=timezone.utc)
BTC_SPEC = InstrumentSpec(inst_id=BTC, inst_type="SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                          min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"), settle_ccy="USDT", state="live")


def decision(action: str = "OPEN_LONG", symbol: str = BTC, **fields: Any) -> Decision:
    base: dict[str, Any] = {"size_pct": 0.04, "order_type": "market", "stop_loss": 63700.0, "take_profit": 67600.0, "leverage": 2}
    base.update(fields)
    return Decision(decision=TradeDecision(action=Action(action), symbol=symbol, **base), strategy_used="test")


def account(equity: str | float = "10000", **extra: Any) -> AccountState:
    return AccountState(equity=Decimal(str(equity)), available_balance=Decimal(str(equity)), **extra)


def approve(dec: Decision, *, last: str | float, equity: str | float = "10000", positions: list[Position] | None = None,
            cycle_id: int | None = 1, spec: Any = BTC_SPEC) -> ApprovedOrder:
    verdict = risk_check(decision=dec, market=MarketRef(last=last, ts=T0), account=account(equity), positions=positions or [],
                         bot=BotStateView(), instrument=spec, cycle_id=cycle_id, now=T0)
    assert verdict.approved, verdict.failures
    assert verdict.approved_order is not None, verdict.warnings
    return verdict.approved_order
