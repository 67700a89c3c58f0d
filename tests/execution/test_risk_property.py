"""Property: for random decisions, accounts, positions and bot states, the gate approves exactly
when every rule holds. The oracle below is written independently (exact fractions, numpy for
the correlation) from the risk table and the default thresholds; it never calls the gate's helpers.
"""
from __future__ import annotations

import math
import random
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction

import numpy as np
from hypothesis import given, settings, strategies as st

from brain.schemas import Action, Decision, TradeDecision
from execution.exchanges.base import AccountState, Position
from execution.risk import BotStateView, MarketRef, risk_check
from tests.conftest import IN_CI_PROFILE
from tests.execution.helpers import BTC, BTC_SPEC, T0

EXAMPLES = 10_000 if IN_CI_PROFILE else 500
OTHERS = ["ETH-USDT-SWAP", "SOL-USDT-SWAP", "XRP-USDT-SWAP", BTC]
F = Fraction

def on_tick(value: float) -> float:
    return round(value * 10) / 10


def scrambled_seeds() -> st.SearchStrategy[int]:
    """Seeds spread evenly: Hypothesis' own integers crowd at 0 and at range edges, and the
    magnitudes drawn from such seeds (a stop AT the entry, a zero target...) would almost never
    give a decision that passes every rule."""
    m = 1_000_003
    return st.integers(0, 2**24).map(lambda k: (k * 2_654_435_761 + m // 2) % m)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    # Magnitudes and coin flips come from one scrambled seed (few Hypothesis draws keep 10,000
    # examples inside a minute); the categorical parts are Hypothesis draws.
    rng = random.Random(draw(scrambled_seeds()))
    specials = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e300]

    def spoil(value: float | None) -> float | None:
        return rng.choice(specials) if rng.random() < 1 / 20 else value

    last = spoil(on_tick(rng.uniform(1000, 100000)))
    base = last if last is not None and math.isfinite(last) and last > 0 else 50000.0
    action = draw(st.sampled_from(["OPEN_LONG", "OPEN_SHORT", "ADD", "OPEN_LONG", "OPEN_SHORT", "HOLD", "CLOSE", "REDUCE"]))
    order_type = draw(st.sampled_from(["market", "market", "limit"]))
    limit = None
    if order_type == "limit" and rng.random() > 1 / 12:
        limit = spoil(on_tick(base * rng.uniform(0.97, 1.03)))
    ref = limit if (limit is not None and math.isfinite(limit) and limit > 0) else base
    positions = [(rng.choice(OTHERS), rng.choice(["long", "short"]), spoil(round(rng.uniform(0, 600), 2)))
                 for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4]))]
    held_short = any(inst == BTC and side == "short" for inst, side, _ in positions)
    sign = -1 if action == "OPEN_SHORT" or (action == "ADD" and held_short) else 1  # +1: stop below, target above
    if rng.random() < 1 / 8:
        sign = -sign  # the wrong side
    stop_dist = rng.uniform(0, 0.033)
    tp_dist = stop_dist * rng.uniform(1.2, 3.0)
    stop = None if rng.random() < 1 / 12 else spoil(on_tick(ref * (1 - sign * stop_dist)))
    tp = None if rng.random() < 1 / 12 else spoil(on_tick(ref * (1 + sign * tp_dist)))
    size_pct = spoil(round(rng.uniform(0, 0.055), 6))
    leverage = spoil(rng.choice([1.0, 2.0, 2.5, 3.0, 3.0, 3.0, 3.5, 0.5]))
    equity = spoil(round(rng.uniform(1000, 100000), 2))
    e = equity if equity is not None and math.isfinite(equity) and equity > 0 else 10000.0
    day_start = spoil(round(e * rng.uniform(0.95, 1.05), 2)) if rng.random() < 0.5 else None
    peak = spoil(round(e * rng.uniform(1.0, 1.15), 2)) if rng.random() < 0.5 else None
    state = draw(st.sampled_from(["RUNNING"] * 12 + ["HALTED", "COOLDOWN", "EMERGENCY_HALT"]))
    until = draw(st.sampled_from([None, T0 - timedelta(minutes=1), T0 + timedelta(minutes=1)]))
    losses = draw(st.sampled_from([0, 0, 0, 0, 1, 2, 3, 4]))
    returns = None
    if positions and rng.random() < 0.5:
        n = rng.randint(20, 40)
        common = [rng.gauss(0, 0.01) for _ in range(n)]
        returns = {}
        for inst in OTHERS:
            weight = rng.random()
            returns[inst] = [weight * c + rng.gauss(0, 0.005) for c in common]
    mark = on_tick(rng.uniform(1000, 100000)) if rng.random() < 0.5 else None
    return dict(last=last, mark=mark, action=action, order_type=order_type, limit=limit, stop=stop, tp=tp, size_pct=size_pct,
                leverage=leverage, equity=equity, day_start=day_start, peak=peak, positions=positions, state=state,
                until=until, losses=losses, returns=returns)


def frac(value: float | None) -> Fraction | None:
    """Exact value of a finite float as the decimal a person wrote (shortest repr); None if not finite."""
    if value is None or not math.isfinite(value):
        return None
    return F(repr(value))


def good(value: float | None, limit: float) -> Fraction | None:
    v = frac(value)
    return v if v is not None and 0 < v <= limit else None


def oracle(s: dict) -> bool:
    if s["action"] in ("HOLD", "CLOSE", "REDUCE"):
        return True
    ok = True
    mine = {side for inst, side, _ in s["positions"] if inst == BTC}
    if s["action"] == "ADD":
        if len(mine) != 1:
            return False
        long = mine == {"long"}
    else:
        long = s["action"] == "OPEN_LONG"
    direction = "long" if long else "short"
    # bot state and cooldown
    active = s["until"] is None or T0 < s["until"]
    if s["state"] == "EMERGENCY_HALT" or (s["state"] in ("HALTED", "COOLDOWN") and active):
        ok = False
    if s["losses"] >= 3 and s["state"] != "COOLDOWN":
        ok = False
    e = good(s["equity"], 1e13)
    if e is None:
        return False
    for ref_value, limit in ((s["day_start"], F(3, 100)), (s["peak"], F(10, 100))):
        if ref_value is None:
            continue
        r = good(ref_value, 1e13)
        if r is None or (r - e) / r >= limit:
            ok = False
    keys = {(inst, side) for inst, side, _ in s["positions"]}
    if len(keys) + (0 if (BTC, direction) in keys else 1) > 3:
        ok = False
    notionals = [frac(n) for _, _, n in s["positions"]]
    if any(n is None or abs(n) > 10**13 for n in notionals):
        return False
    size = good(s["size_pct"], 1000)
    if size is None:
        return False
    if sum(abs(n) for n in notionals) / e + size > F(15, 100):
        ok = False
    same = next((abs(frac(n)) for inst, side, n in s["positions"] if inst == BTC and side == direction), F(0))
    if size + same / e > F(5, 100):
        ok = False
    lev = good(s["leverage"], 125)
    if lev is None or lev < 1 or lev > 3:
        ok = False
    if s["order_type"] == "limit":
        entry = good(s["limit"], 1e9)
    else:
        entry = good(s["last"], 1e9) or good(s["mark"], 1e9)
    stop, tp = good(s["stop"], 1e9), good(s["tp"], 1e9)
    if entry is None or stop is None or tp is None:
        return False
    sign = 1 if long else -1
    if sign * (entry - stop) <= 0 or sign * (tp - entry) <= 0:
        return False
    if abs(entry - stop) / entry > F(3, 100):
        ok = False
    if abs(tp - entry) / abs(entry - stop) < F(3, 2):
        ok = False
    if s["returns"] is not None:
        held = {inst for inst, side, _ in s["positions"] if side == direction and inst != BTC}
        for inst in held:
            a, b = np.array(s["returns"][BTC]), np.array(s["returns"][inst])
            if min(len(a), len(b)) < 24 or a.std() == 0 or b.std() == 0:
                continue
            if np.corrcoef(a, b)[0, 1] > 0.8:
                ok = False
    contracts = math.floor(size * e / (entry * F(1, 100)) / F(1, 100)) * F(1, 100)
    if contracts < F(1, 100):
        ok = False
    return ok


@settings(max_examples=EXAMPLES)
@given(scenarios())
def test_the_gate_approves_exactly_when_every_rule_holds(s: dict) -> None:
    decision = Decision(decision=TradeDecision(
        action=Action(s["action"]), symbol=BTC, size_pct=s["size_pct"], order_type=s["order_type"], limit_price=s["limit"],
        stop_loss=s["stop"], take_profit=s["tp"], leverage=s["leverage"], entry_price=12345.0))
    account = AccountState(equity=s["equity"], available_balance=Decimal("1"), day_start_equity=s["day_start"], peak_equity=s["peak"])  # type: ignore[arg-type]
    positions = [Position(inst_id=i, pos_side=side, notional_usd=n, size=Decimal("1")) for i, side, n in s["positions"]]  # type: ignore[arg-type]
    bot = BotStateView(state=s["state"], until=s["until"], consecutive_losses=s["losses"])
    verdict = risk_check(decision=decision, market=MarketRef(last=s["last"], mark=s["mark"], ts=T0), account=account,
                         positions=positions, bot=bot, returns_1h=s["returns"], instrument=BTC_SPEC, now=T0)
    expected = oracle(s)
    assert verdict.approved is expected, (verdict.failures, s)
    assert verdict.approved == (not verdict.failures)
    if expected and s["action"] not in ("HOLD", "CLOSE", "REDUCE"):
        assert verdict.approved_order is not None and verdict.approved_order.size > 0
