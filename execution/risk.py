"""The risk gate: hard-coded rules no model can override (DESIGN.md, risk table).

Each rule is a function of the checked context that returns a reason (the rule
failed) or None. `risk_check` runs all of them, collects EVERY failure, and
only when none failed builds an `ApprovedOrder` -- the one object
`order_place` and `Exchange.place_order` accept. Its constructor demands a
token private to this module, so nothing else can make one.

The SL distance and reward:risk use the real entry reference (last, else mark,
for a market order; the limit price for a limit order), never the model's
`entry_price`. Thresholds come from settings. Bad numbers (NaN, inf, negative,
absurd) fail the rules that need them, with a reason; nothing here raises.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable

from django.conf import settings
from django.utils import timezone

from brain.schemas import ALWAYS_ALLOWED_ACTIONS, Action, Decision
from execution.validation import (
    ABSURD_MONEY,
    SpecLike,
    contracts_for,
    positive,
    price_on_tick,
    round_down_to_lot,
    sides_check,
    size_failure,
    to_decimal,
)

if TYPE_CHECKING:  # annotations only: the exchange interface imports this module (ApprovedOrder), not the reverse
    from execution.exchanges.base import Position

_GATE = object()  # only this module holds it: the proof an order went through the gate
ABSURD_LEVERAGE = Decimal("125")
MIN_CORRELATION_POINTS = 24


@dataclass(frozen=True, slots=True)
class MarketRef:
    """The market's own prices at decision time (from the ticker/snapshot, not the model)."""

    last: Any
    mark: Any = None
    inst_id: str = ""
    ts: datetime | None = None


@dataclass(frozen=True, slots=True)
class BotStateView:
    state: str = "RUNNING"
    consecutive_losses: int = 0
    until: datetime | None = None
    reason: str = ""
    since: datetime | None = None
    by: str = ""
    day_start_equity: Decimal | None = None
    peak_equity: Decimal | None = None


@dataclass(frozen=True)
class ApprovedOrder:
    """An order the gate approved. Build one only through `risk_check`."""

    kind: str  # open, close, reduce
    action: str
    inst_id: str
    side: str  # buy / sell
    pos_side: str  # long / short
    order_type: str  # market / limit
    size: Decimal  # contracts (0 for a close: the whole position)
    client_order_id: str
    entry_reference: Decimal
    leverage: Decimal
    price: Decimal | None = None
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    notional_usd: Decimal = Decimal("0")
    size_pct: Decimal = Decimal("0")
    reduce_only: bool = False
    decision: dict[str, Any] = field(default_factory=dict)
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _GATE:
            raise PermissionError("an ApprovedOrder can only be built by the risk gate (execution.risk.risk_check)")

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "action": self.action, "inst_id": self.inst_id, "side": self.side, "pos_side": self.pos_side,
            "order_type": self.order_type, "size": str(self.size), "client_order_id": self.client_order_id,
            "entry_reference": str(self.entry_reference), "leverage": str(self.leverage),
            "price": _s(self.price), "stop_loss": _s(self.stop_loss), "take_profit": _s(self.take_profit),
            "notional_usd": str(self.notional_usd), "size_pct": str(self.size_pct), "reduce_only": self.reduce_only,
            "decision": self.decision,
        }


def approval_is_genuine(order: object) -> bool:
    return isinstance(order, ApprovedOrder) and order._token is _GATE


@dataclass(frozen=True)
class RiskVerdict:
    approved: bool
    action: str
    failures: list[tuple[str, str]]
    skipped: list[tuple[str, str]]
    warnings: list[str]
    entry_reference: Decimal | None
    approved_order: ApprovedOrder | None = None

    @property
    def failed_rules(self) -> list[str]:
        return [rule for rule, _ in self.failures]

    def as_json(self) -> dict[str, Any]:
        return {
            "approved": self.approved,
            "action": self.action,
            "failed_rules": [{"rule": r, "reason": why} for r, why in self.failures],
            "skipped_rules": [{"rule": r, "reason": why} for r, why in self.skipped],
            "warnings": self.warnings,
            "entry_reference": _s(self.entry_reference),
            "approved_order": self.approved_order.as_json() if self.approved_order else None,
        }


def _s(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def client_order_id_for(*, decision: Decision, cycle_id: int | None, salt: str = "") -> str:
    """Deterministic OKX clOrdId (1-32 alphanumerics): the same decision in the same cycle gives the same id."""
    key = f"{cycle_id}|{salt}|{decision.model_dump_json()}"
    return "tb" + hashlib.sha256(key.encode()).hexdigest()[:30]


# --- The checked context ----------------------------------------------------------
@dataclass
class _Ctx:
    action: Action
    long: bool | None
    equity: Decimal | None
    equity_reason: str | None
    size_pct: Decimal | None
    size_reason: str | None
    leverage: Decimal | None
    leverage_reason: str | None
    entry: Decimal | None
    entry_reason: str | None
    stop_loss: Decimal | None
    stop_reason: str | None
    take_profit: Decimal | None
    tp_reason: str | None
    positions: list[Position]
    same_key: Position | None
    exposure_now: Decimal | None
    exposure_reason: str | None
    bot: BotStateView
    now: datetime
    day_start: Decimal | None
    peak: Decimal | None
    returns: dict[str, list[float]] | None
    symbol: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _check_bot_state(c: _Ctx) -> str | None:
    if c.bot.state == "EMERGENCY_HALT":
        return f"bot is in EMERGENCY_HALT ({c.bot.reason or 'drawdown'}); only a person can resume it"
    if c.bot.state == "HALTED" and (c.bot.until is None or c.now < c.bot.until):
        return f"bot is HALTED until {c.bot.until.isoformat() if c.bot.until else 'a person resumes it'}: {c.bot.reason}"
    return None


def _check_cooldown(c: _Ctx) -> str | None:
    if c.bot.state == "COOLDOWN" and (c.bot.until is None or c.now < c.bot.until):
        return f"cooling down after {c.bot.consecutive_losses} consecutive losses until {c.bot.until}"
    if c.bot.consecutive_losses >= settings.MAX_CONSECUTIVE_LOSSES and c.bot.state != "COOLDOWN":
        return f"{c.bot.consecutive_losses} consecutive losses reached the limit {settings.MAX_CONSECUTIVE_LOSSES}: cooldown"
    return None


def _check_daily_loss(c: _Ctx) -> str | None:
    if c.equity is None:
        return c.equity_reason
    if c.day_start is None:
        c.skipped.append(("daily_loss", "no day-start equity known yet"))
        return None
    loss = (c.day_start - c.equity) / c.day_start
    if loss >= settings.MAX_DAILY_LOSS_PCT:
        return f"daily loss {loss:.4%} reached the limit {settings.MAX_DAILY_LOSS_PCT:.2%} of day-start equity {c.day_start}"
    return None


def _check_drawdown(c: _Ctx) -> str | None:
    if c.equity is None:
        return c.equity_reason
    if c.peak is None:
        c.skipped.append(("drawdown", "no peak equity known yet"))
        return None
    drawdown = (c.peak - c.equity) / c.peak
    if drawdown >= settings.MAX_DRAWDOWN_PCT:
        return f"drawdown {drawdown:.4%} from peak {c.peak} reached the limit {settings.MAX_DRAWDOWN_PCT:.2%}"
    return None


def _check_positions(c: _Ctx) -> str | None:
    count = len({(p.inst_id, p.pos_side) for p in c.positions})
    after = count if c.same_key is not None else count + 1
    if after > settings.MAX_CONCURRENT_POSITIONS:
        return f"{count} open positions; one more exceeds the limit {settings.MAX_CONCURRENT_POSITIONS}"
    return None


def _check_exposure(c: _Ctx) -> str | None:
    for reason in (c.equity_reason, c.size_reason, c.exposure_reason):
        if reason:
            return reason
    assert c.equity is not None and c.size_pct is not None and c.exposure_now is not None
    total = c.exposure_now / c.equity + c.size_pct
    if total > settings.MAX_TOTAL_EXPOSURE_PCT:
        return f"total exposure would be {total:.4%} of equity, above the limit {settings.MAX_TOTAL_EXPOSURE_PCT:.2%}"
    return None


def _check_single_trade(c: _Ctx) -> str | None:
    for reason in (c.equity_reason, c.size_reason):
        if reason:
            return reason
    assert c.equity is not None and c.size_pct is not None
    existing = abs(to_decimal(c.same_key.notional_usd) or Decimal("0")) if c.same_key else Decimal("0")
    pct = c.size_pct + existing / c.equity
    if pct > settings.MAX_SINGLE_TRADE_PCT:
        return f"position would be {pct:.4%} of equity, above the limit {settings.MAX_SINGLE_TRADE_PCT:.2%}"
    return None


def _check_leverage(c: _Ctx) -> str | None:
    if c.leverage_reason:
        return c.leverage_reason
    assert c.leverage is not None
    if c.leverage > settings.MAX_LEVERAGE:
        return f"leverage {c.leverage}x is above the limit {settings.MAX_LEVERAGE}x"
    return None


def _check_stop_loss(c: _Ctx) -> str | None:
    if c.stop_reason:
        return c.stop_reason
    if c.entry is None:
        return f"no entry reference to check the stop against: {c.entry_reason}"
    return sides_check(long=bool(c.long), entry=c.entry, stop_loss=c.stop_loss, take_profit=None).stop_reason


def _check_sl_distance(c: _Ctx) -> str | None:
    if c.entry is None:
        return f"no entry reference: {c.entry_reason}"
    if c.stop_loss is None:
        return c.stop_reason or "a stop loss is required"
    distance = abs(c.entry - c.stop_loss) / c.entry
    if distance > settings.MAX_SL_DISTANCE_PCT:
        return f"stop loss is {distance:.4%} from the entry reference {c.entry}, above the limit {settings.MAX_SL_DISTANCE_PCT:.2%}"
    return None


def _check_reward_risk(c: _Ctx) -> str | None:
    if c.entry is None:
        return f"no entry reference: {c.entry_reason}"
    if c.tp_reason:
        return c.tp_reason
    if c.stop_loss is None:
        return c.stop_reason or "a stop loss is required"
    sides = sides_check(long=bool(c.long), entry=c.entry, stop_loss=c.stop_loss, take_profit=c.take_profit)
    if sides.take_profit_reason:
        return sides.take_profit_reason
    if sides.stop_reason:
        return f"reward:risk undefined: {sides.stop_reason}"
    assert c.take_profit is not None
    ratio = abs(c.take_profit - c.entry) / abs(c.entry - c.stop_loss)
    if ratio < settings.MIN_RR_RATIO:
        return f"reward:risk {ratio:.3f} is below the minimum {settings.MIN_RR_RATIO}"
    return None


def pearson(a: list[float], b: list[float]) -> float | None:
    """Correlation of the overlapping tails; None when there is too little clean data."""
    n = min(len(a), len(b), settings.CORRELATION_LOOKBACK_HOURS)
    if n < MIN_CORRELATION_POINTS:
        return None
    try:
        xs = [float(v) for v in a[-n:]]
        ys = [float(v) for v in b[-n:]]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in xs + ys):
        return None
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxy = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    syy = math.fsum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    r = sxy / math.sqrt(sxx * syy)
    return r if math.isfinite(r) else None


def _check_correlation(c: _Ctx) -> str | None:
    if c.returns is None:
        c.skipped.append(("correlation", "no 1H returns given: correlation rule skipped"))
        return None
    direction = "long" if c.long else "short"
    held = sorted({p.inst_id for p in c.positions if p.pos_side == direction and p.inst_id != c.symbol})
    mine = c.returns.get(c.symbol)
    limit = float(settings.MAX_CORRELATION)
    for other in held:
        theirs = c.returns.get(other)
        r = pearson(mine, theirs) if isinstance(mine, list) and isinstance(theirs, list) else None
        if r is None:
            c.skipped.append(("correlation", f"not enough 1H returns to correlate {c.symbol} with {other}"))
            continue
        if r > limit:
            return f"{c.symbol} has r={r:.3f} > {limit} with the open {direction} position in {other}"
    return None


RULES: tuple[tuple[str, Callable[[_Ctx], str | None]], ...] = (
    ("bot_state", _check_bot_state),
    ("cooldown", _check_cooldown),
    ("daily_loss", _check_daily_loss),
    ("drawdown", _check_drawdown),
    ("max_positions", _check_positions),
    ("total_exposure", _check_exposure),
    ("single_trade", _check_single_trade),
    ("leverage", _check_leverage),
    ("stop_loss", _check_stop_loss),
    ("sl_distance", _check_sl_distance),
    ("reward_risk", _check_reward_risk),
    ("correlation", _check_correlation),
)
RULE_NAMES = tuple(name for name, _ in RULES) + ("order",)


# --- The gate -------------------------------------------------------------------
def _entry_reference(decision_order_type: str, limit_price: Any, market: MarketRef, spec: SpecLike | None) -> tuple[Decimal | None, str | None]:
    if decision_order_type == "limit":
        price, reason = positive(limit_price, "limit_price")
        if price is not None and spec is not None:
            return price_on_tick(price, spec, "limit_price")
        return price, reason
    last, last_reason = positive(market.last, "market last price")
    if last is not None:
        return last, None
    mark, mark_reason = positive(market.mark, "market mark price")
    if mark is not None:
        return mark, None
    return None, f"no usable market price ({last_reason}; {mark_reason})"


def _price(value: Any, name: str, spec: SpecLike | None) -> tuple[Decimal | None, str | None]:
    if value is None:
        return None, None
    price, reason = positive(value, name)
    if price is not None and spec is not None:
        return price_on_tick(price, spec, name)
    return price, reason


def _exposure(positions: list[Position]) -> tuple[Decimal | None, str | None]:
    total = Decimal("0")
    for p in positions:
        notional = to_decimal(p.notional_usd)
        if notional is None or abs(notional) > ABSURD_MONEY:
            return None, f"open position {p.inst_id} {p.pos_side} has an unusable notional: {p.notional_usd!r}"
        total += abs(notional)
    return total, None


def risk_check(
    *,
    decision: Decision,
    market: MarketRef,
    account: Any,
    positions: list[Position],
    bot: BotStateView,
    returns_1h: dict[str, list[float]] | None = None,
    instrument: SpecLike | None = None,
    cycle_id: int | None = None,
    now: datetime | None = None,
) -> RiskVerdict:
    """Check a decision against every rule; approve (with an `ApprovedOrder`) only when none failed.

    `account` needs `equity`, `available_balance` and optionally `day_start_equity`
    / `peak_equity` (an `AccountState`); the bot's own day-start/peak values win when set.
    """
    td = decision.decision
    action = td.action
    now = now or market.ts or timezone.now()
    positions = list(positions)
    symbol = td.symbol.strip()
    warnings: list[str] = []
    mine = [p for p in positions if p.inst_id == symbol]

    equity, equity_reason = positive(getattr(account, "equity", None), "account equity", limit=ABSURD_MONEY)
    entry, entry_reason = _entry_reference(td.order_type, td.limit_price, market, instrument)

    if action in ALWAYS_ALLOWED_ACTIONS:
        order = None
        if action != Action.HOLD:
            order, why = _closing_order(decision, mine, entry, equity, instrument, cycle_id, market)
            if why:
                warnings.append(why)
        return RiskVerdict(True, action.value, [], [], warnings, entry, order)

    if action == Action.ADD:
        long: bool | None = None
        sides = {p.pos_side for p in mine}
        if len(sides) == 1:
            long = sides == {"long"}
    else:
        long = action == Action.OPEN_LONG
    direction = "long" if long else "short"
    same_key = next((p for p in mine if p.pos_side == direction), None) if long is not None else None

    size_pct, size_reason = positive(td.size_pct, "size_pct", limit=Decimal("1000"))
    leverage, leverage_reason = positive(td.leverage, "leverage", limit=ABSURD_LEVERAGE)
    if leverage is not None and leverage < 1:
        leverage, leverage_reason = None, f"leverage must be at least 1, got {leverage}"
    stop_loss, stop_reason = _price(td.stop_loss, "stop_loss", instrument)
    if td.stop_loss is None:
        stop_reason = "a stop loss is required"
    take_profit, tp_reason = _price(td.take_profit, "take_profit", instrument)
    if td.take_profit is None:
        tp_reason = "a take profit is required to compute reward:risk"
    exposure_now, exposure_reason = _exposure(positions)
    day_start = bot.day_start_equity if bot.day_start_equity is not None else getattr(account, "day_start_equity", None)
    peak = bot.peak_equity if bot.peak_equity is not None else getattr(account, "peak_equity", None)
    ctx = _Ctx(
        action=action, long=long, equity=equity, equity_reason=equity_reason, size_pct=size_pct, size_reason=size_reason,
        leverage=leverage, leverage_reason=leverage_reason, entry=entry, entry_reason=entry_reason,
        stop_loss=stop_loss, stop_reason=stop_reason, take_profit=take_profit, tp_reason=tp_reason,
        positions=positions, same_key=same_key, exposure_now=exposure_now, exposure_reason=exposure_reason,
        bot=bot, now=now, day_start=None, peak=None, returns=returns_1h, symbol=symbol,
    )
    failures: list[tuple[str, str]] = []
    for name, value in (("daily_loss", day_start), ("drawdown", peak)):
        if value is None:
            continue
        checked, reason = positive(value, f"{name} reference equity", limit=ABSURD_MONEY)
        if reason:
            failures.append((name, reason))
        elif name == "daily_loss":
            ctx.day_start = checked
        else:
            ctx.peak = checked
    failed_already = {rule for rule, _ in failures}
    for name, check in RULES:
        if name in failed_already:
            continue
        reason = check(ctx)
        if reason:
            failures.append((name, reason))

    # The order itself: symbol, direction, contracts on the lot.
    order_reasons: list[str] = []
    if not symbol:
        order_reasons.append("decision has no symbol")
    if market.inst_id and market.inst_id != symbol:
        order_reasons.append(f"market prices are for {market.inst_id}, the decision is for {symbol}")
    if long is None:
        order_reasons.append(f"ADD needs exactly one open position in {symbol}, found {len(mine)}")
    size: Decimal | None = None
    if instrument is None:
        ctx.skipped.append(("order", "no instrument spec given: contract size not checked and no order built"))
    else:
        if instrument.inst_id != symbol:
            order_reasons.append(f"instrument spec is for {instrument.inst_id}, the decision is for {symbol}")
        if size_pct is not None and equity is not None and entry is not None:
            size = contracts_for(notional=size_pct * equity, price=entry, spec=instrument)
            why = size_failure(size, instrument)
            if why:
                order_reasons.append(why)
    if order_reasons:
        failures.append(("order", "; ".join(order_reasons)))

    approved = not failures
    order = None
    if approved and instrument is not None and size is not None:
        assert entry is not None and leverage is not None and equity is not None and size_pct is not None
        order = ApprovedOrder(
            kind="open", action=action.value, inst_id=symbol, side="buy" if long else "sell", pos_side=direction,
            order_type=td.order_type, size=size, client_order_id=client_order_id_for(decision=decision, cycle_id=cycle_id, salt=_salt(market)),
            entry_reference=entry, leverage=leverage, price=entry if td.order_type == "limit" else None,
            stop_loss=stop_loss, take_profit=take_profit, notional_usd=size * Decimal(instrument.ct_val) * entry,
            size_pct=size_pct, reduce_only=False, decision=decision.model_dump(mode="json"), _token=_GATE,
        )
    return RiskVerdict(approved, action.value, failures, ctx.skipped, warnings, entry, order)


def _salt(market: MarketRef) -> str:
    # Without a cycle id the market time keeps two identical decisions at different times apart.
    return market.ts.isoformat() if market.ts else ""


def _closing_order(
    decision: Decision, mine: list[Position], entry: Decimal | None, equity: Decimal | None,
    spec: SpecLike | None, cycle_id: int | None, market: MarketRef,
) -> tuple[ApprovedOrder | None, str | None]:
    """CLOSE and REDUCE always pass; build the reduce-only order when there is something to reduce."""
    td = decision.decision
    if not mine:
        return None, f"no open position in {td.symbol} to {td.action.value.lower()}"
    pos = sorted(mine, key=lambda p: p.pos_side)[0]
    warning = None
    if len(mine) > 1:
        warning = f"{td.symbol} has long and short positions; {td.action.value} acts on the {pos.pos_side} one"
    size = Decimal(pos.size)
    kind = "close"
    if td.action == Action.REDUCE:
        kind = "reduce"
        if spec is None:
            return None, "no instrument spec: cannot size a REDUCE"
        size_pct, _ = positive(td.size_pct, "size_pct", limit=Decimal("1000"))
        if size_pct is not None and equity is not None and entry is not None:
            size = min(contracts_for(notional=size_pct * equity, price=entry, spec=spec), Decimal(pos.size))
        else:
            size = round_down_to_lot(Decimal(pos.size) / 2, Decimal(spec.lot_sz))
            warning = f"REDUCE without a usable size_pct halves the position ({size} contracts)"
        if size <= 0:
            return None, f"REDUCE of {td.symbol} rounds to 0 contracts; nothing sent"
    reference = entry or pos.mark_px or pos.avg_px or Decimal("0")
    order = ApprovedOrder(
        kind=kind, action=td.action.value, inst_id=td.symbol, side="sell" if pos.pos_side == "long" else "buy",
        pos_side=pos.pos_side, order_type="market", size=size,
        client_order_id=client_order_id_for(decision=decision, cycle_id=cycle_id, salt=_salt(market)),
        entry_reference=Decimal(reference), leverage=Decimal(pos.leverage), reduce_only=True,
        decision=decision.model_dump(mode="json"), _token=_GATE,
    )
    return order, warning
