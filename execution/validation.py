"""Order validation: numbers that are really numbers, sizes on the lot, prices on the tick.

Used by the risk gate before it builds an `ApprovedOrder`, so nothing that an
exchange would bounce (or, worse, accept wrongly) leaves the gate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Protocol

# Rounding a price to the tick may move it by at most this fraction; more means
# the price is absurd for the instrument (e.g. 0.03 on a 0.1 tick).
MAX_TICK_ROUNDING_MOVE = Decimal("0.001")
# Beyond these a number is not a price, size or equity anyone meant.
ABSURD_PRICE = Decimal("1e9")
ABSURD_MONEY = Decimal("1e13")


class SpecLike(Protocol):
    inst_id: str
    ct_val: Decimal
    lot_sz: Decimal
    min_sz: Decimal
    tick_sz: Decimal


def to_decimal(value: Any) -> Decimal | None:
    """A finite Decimal from a float/int/str/Decimal, or None (NaN, inf, bools, junk, missing)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return Decimal(repr(value))
    try:
        result = Decimal(str(value).strip()) if not isinstance(value, Decimal) else value
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() else None


def positive(value: Any, name: str, *, limit: Decimal = ABSURD_PRICE) -> tuple[Decimal | None, str | None]:
    """(value, None) for a positive finite number below `limit`, else (None, reason)."""
    number = to_decimal(value)
    if number is None:
        return None, f"{name} is not a finite number: {value!r}"
    if number <= 0:
        return None, f"{name} must be positive, got {number}"
    if number > limit:
        return None, f"{name} is absurdly large: {number}"
    return number, None


def round_to_tick(price: Decimal, tick: Decimal) -> Decimal:
    return (price / tick).quantize(Decimal("1"), rounding=ROUND_HALF_UP) * tick


def round_down_to_lot(size: Decimal, lot: Decimal) -> Decimal:
    return (size / lot).quantize(Decimal("1"), rounding=ROUND_DOWN) * lot


def price_on_tick(price: Decimal, spec: SpecLike, name: str) -> tuple[Decimal | None, str | None]:
    """Round a price to the instrument's tick; refuse when that moves it absurdly."""
    rounded = round_to_tick(price, Decimal(spec.tick_sz))
    if rounded <= 0 or abs(rounded - price) / price > MAX_TICK_ROUNDING_MOVE:
        return None, f"{name} {price} does not fit tick size {spec.tick_sz} of {spec.inst_id} (rounds to {rounded})"
    return rounded, None


def contracts_for(*, notional: Decimal, price: Decimal, spec: SpecLike) -> Decimal:
    """Contracts worth `notional` USD at `price`, rounded DOWN to the lot (never more than asked)."""
    raw = notional / (price * Decimal(spec.ct_val))
    return round_down_to_lot(raw, Decimal(spec.lot_sz))


def size_failure(size: Decimal, spec: SpecLike) -> str | None:
    if size <= 0 or size < Decimal(spec.min_sz):
        return f"size {size} contracts after rounding to lot {spec.lot_sz} is below the minimum {spec.min_sz} of {spec.inst_id}"
    return None


@dataclass(frozen=True, slots=True)
class SideCheck:
    stop_reason: str | None
    take_profit_reason: str | None


def sides_check(*, long: bool, entry: Decimal, stop_loss: Decimal | None, take_profit: Decimal | None) -> SideCheck:
    """Stop below and target above the entry for a long; the reverse for a short."""
    stop_reason = None
    tp_reason = None
    if stop_loss is None:
        stop_reason = "a stop loss is required"
    elif long and stop_loss >= entry:
        stop_reason = f"stop loss {stop_loss} must be below the entry reference {entry} for a long"
    elif not long and stop_loss <= entry:
        stop_reason = f"stop loss {stop_loss} must be above the entry reference {entry} for a short"
    if take_profit is None:
        tp_reason = "a take profit is required to compute reward:risk"
    elif long and take_profit <= entry:
        tp_reason = f"take profit {take_profit} must be above the entry reference {entry} for a long"
    elif not long and take_profit >= entry:
        tp_reason = f"take profit {take_profit} must be below the entry reference {entry} for a short"
    return SideCheck(stop_reason, tp_reason)
