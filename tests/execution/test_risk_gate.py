"""Every rule of the risk table at, just under and just over its boundary (default thresholds),
bad numbers rejected with a reason, and the structural guarantee around ApprovedOrder."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from execution.exchanges.base import AccountState, Position
from execution.risk import ApprovedOrder, BotStateView, MarketRef, risk_check
from tests.execution.helpers import BTC, BTC_SPEC, T0, decision

D = Decimal
ETH, SOL, XRP = "ETH-USDT-SWAP", "SOL-USDT-SWAP", "XRP-USDT-SWAP"


def check(dec=None, *, last=65000.0, mark=None, equity="10000", day_start=None, peak=None, positions=(), bot=None, returns=None, spec=BTC_SPEC):
    acct = AccountState(equity=equity if not isinstance(equity, str) else D(equity), available_balance=D("10000"),
                        day_start_equity=None if day_start is None else D(str(day_start)),
                        peak_equity=None if peak is None else D(str(peak)))
    return risk_check(decision=dec or decision(), market=MarketRef(last=last, mark=mark, ts=T0), account=acct,
                      positions=list(positions), bot=bot or BotStateView(), returns_1h=returns, instrument=spec, now=T0)


def rules(verdict) -> set[str]:
    return set(verdict.failed_rules)


def pos(inst: str, side: str = "long", notional: str = "100") -> Position:
    return Position(inst_id=inst, pos_side=side, size=D("1"), avg_px=D("100"), notional_usd=D(notional))


def test_a_sound_decision_is_approved_with_an_order_in_contracts() -> None:
    verdict = check()
    assert verdict.approved and verdict.failures == []
    order = verdict.approved_order
    assert order.size == D("0.61")  # 400 USDT / (65000 * 0.01) = 0.615 -> down to the lot
    assert (order.side, order.pos_side, order.stop_loss, order.take_profit) == ("buy", "long", D("63700.0"), D("67600.0"))
    assert order.client_order_id.isalnum() and 1 <= len(order.client_order_id) <= 32


@pytest.mark.parametrize("equity,ok", [("9700", False), ("9700.01", True), ("9699.99", False)])
def test_daily_loss_boundary(equity: str, ok: bool) -> None:
    assert ("daily_loss" not in rules(check(equity=equity, day_start=10000))) is ok


@pytest.mark.parametrize("equity,ok", [("9000", False), ("9000.01", True), ("8999.99", False)])
def test_drawdown_boundary(equity: str, ok: bool) -> None:
    assert ("drawdown" not in rules(check(equity=equity, peak=10000))) is ok


@pytest.mark.parametrize("others,ok", [(1, True), (2, True), (3, False)])
def test_max_concurrent_positions_boundary(others: int, ok: bool) -> None:
    held = [pos(i) for i in (ETH, SOL, XRP)[:others]]
    assert ("max_positions" not in rules(check(positions=held))) is ok


def test_adding_to_a_held_position_does_not_count_as_another_one() -> None:
    held = [pos(ETH), pos(SOL), pos(BTC, notional="50")]
    assert "max_positions" not in rules(check(decision("ADD", size_pct=0.01), positions=held))


@pytest.mark.parametrize("existing,ok", [("1100", True), ("1099.99", True), ("1100.01", False)])
def test_total_exposure_boundary(existing: str, ok: bool) -> None:
    assert ("total_exposure" not in rules(check(decision(size_pct=0.04), positions=[pos(ETH, notional=existing)]))) is ok


@pytest.mark.parametrize("size_pct,ok", [(0.05, True), (0.0499999, True), (0.0500001, False)])
def test_single_trade_boundary(size_pct: float, ok: bool) -> None:
    assert ("single_trade" not in rules(check(decision(size_pct=size_pct)))) is ok


@pytest.mark.parametrize("leverage,ok", [(3, True), (2.9999, True), (3.0001, False)])
def test_leverage_boundary(leverage: float, ok: bool) -> None:
    assert ("leverage" not in rules(check(decision(leverage=leverage)))) is ok


@pytest.mark.parametrize("stop,ok", [(63050.0, True), (63050.1, True), (63049.9, False)])
def test_stop_distance_boundary_from_the_last_price(stop: float, ok: bool) -> None:
    assert ("sl_distance" not in rules(check(decision(stop_loss=stop, take_profit=70000.0)))) is ok


@pytest.mark.parametrize("tp,ok", [(66950.0, True), (66950.1, True), (66949.9, False)])
def test_reward_risk_boundary(tp: float, ok: bool) -> None:
    assert ("reward_risk" not in rules(check(decision(stop_loss=63700.0, take_profit=tp)))) is ok


@pytest.mark.parametrize("losses,ok", [(2, True), (3, False), (4, False)])
def test_consecutive_losses_boundary(losses: int, ok: bool) -> None:
    assert ("cooldown" not in rules(check(bot=BotStateView(consecutive_losses=losses)))) is ok


def _series(a: float, b: float, n: int = 48) -> tuple[list[float], list[float]]:
    x = [1.0 if i % 2 == 0 else -1.0 for i in range(n)]
    z = [1.0 if i % 4 < 2 else -1.0 for i in range(n)]
    return x, [a * xi + b * zi for xi, zi in zip(x, z)]  # r = a / sqrt(a^2 + b^2)


@pytest.mark.parametrize("a,b,ok", [(4, 3, True), (4, 3.1, True), (5, 3, False)])  # r = 0.8, 0.790, 0.857
def test_correlation_boundary(a: float, b: float, ok: bool) -> None:
    held_returns, new_returns = _series(a, b)
    returns = {ETH: held_returns, BTC: new_returns}
    assert ("correlation" not in rules(check(positions=[pos(ETH)], returns=returns))) is ok


def test_correlation_only_counts_positions_in_the_same_direction() -> None:
    held_returns, new_returns = _series(5, 3)
    assert check(positions=[pos(ETH, "short")], returns={ETH: held_returns, BTC: new_returns}).approved


def test_without_returns_the_correlation_rule_is_skipped_and_the_verdict_says_so() -> None:
    verdict = check(positions=[pos(ETH)])
    assert verdict.approved
    assert ("correlation", "no 1H returns given: correlation rule skipped") in verdict.skipped


def test_the_models_entry_price_is_never_used() -> None:
    # Right side of the model's claimed entry, wrong side of the real price.
    verdict = check(decision(entry_price=60000.0, stop_loss=59000.0, take_profit=62000.0), last=65000.0)
    assert {"sl_distance", "reward_risk"} <= rules(verdict)
    assert check(decision(entry_price=1.0), last=65000.0).approved


def test_a_limit_order_is_checked_from_its_limit_price() -> None:
    dec = decision(order_type="limit", limit_price=64000.0, stop_loss=62800.0, take_profit=66000.0)
    verdict = check(dec, last=65000.0)
    assert verdict.approved and verdict.entry_reference == D("64000.0")
    assert verdict.approved_order.price == D("64000.0")


def test_market_orders_fall_back_to_the_mark_price() -> None:
    assert check(last=float("nan"), mark=65000.0).entry_reference == D("65000.0")


def test_add_passes_only_if_the_resulting_position_passes() -> None:
    held = [pos(BTC, notional="300")]
    assert check(decision("ADD", size_pct=0.02), positions=held).approved
    assert "single_trade" in rules(check(decision("ADD", size_pct=0.03), positions=held))
    assert "order" in rules(check(decision("ADD", size_pct=0.01)))  # nothing to add to


@pytest.mark.parametrize("action", ["HOLD", "CLOSE", "REDUCE"])
def test_hold_close_and_reduce_always_pass(action: str) -> None:
    bad = BotStateView(state="EMERGENCY_HALT", consecutive_losses=9)
    dec = decision(action, size_pct=float("nan"), leverage=50, stop_loss=None, take_profit=None)
    verdict = check(dec, equity=D("-5"), bot=bad, positions=[pos(BTC, notional="300")])
    assert verdict.approved and verdict.failures == []
    if action == "CLOSE":
        assert verdict.approved_order.reduce_only and verdict.approved_order.side == "sell"


def test_every_failed_rule_is_reported_not_just_the_first() -> None:
    dec = decision(size_pct=0.5, leverage=10, stop_loss=50000.0, take_profit=65100.0)
    verdict = check(dec, bot=BotStateView(state="HALTED", until=T0 + timedelta(hours=1)), equity="10000", day_start=12000)
    assert {"bot_state", "daily_loss", "total_exposure", "single_trade", "leverage", "sl_distance", "reward_risk"} <= rules(verdict)
    assert verdict.approved_order is None


def test_a_halt_whose_time_is_up_no_longer_blocks() -> None:
    assert check(bot=BotStateView(state="HALTED", until=T0 - timedelta(seconds=1))).approved
    assert check(bot=BotStateView(state="COOLDOWN", until=T0 - timedelta(seconds=1), consecutive_losses=3)).approved
    assert not check(bot=BotStateView(state="COOLDOWN", until=T0 + timedelta(seconds=1), consecutive_losses=3)).approved
    assert not check(bot=BotStateView(state="EMERGENCY_HALT")).approved


BAD_NUMBERS = [float("nan"), float("inf"), float("-inf"), -1.0, 0.0, 1e300]


@pytest.mark.parametrize("value", BAD_NUMBERS)
@pytest.mark.parametrize("field", ["size_pct", "leverage", "stop_loss", "take_profit"])
def test_bad_numbers_in_the_decision_are_rejected_with_a_reason(field: str, value: float) -> None:
    verdict = check(decision(**{field: value}))
    assert not verdict.approved
    assert all(reason for _, reason in verdict.failures)


@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_bad_account_and_market_numbers_are_rejected_with_a_reason(value: float) -> None:
    assert not check(equity=value).approved
    assert not check(last=value, mark=value).approved


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e300])
def test_an_unusable_position_notional_is_rejected_with_a_reason(value: float) -> None:
    verdict = check(positions=[Position(ETH, "long", notional_usd=value)])  # type: ignore[arg-type]
    assert "total_exposure" in rules(verdict) and "unusable notional" in dict(verdict.failures)["total_exposure"]


def test_a_price_off_the_tick_is_rounded_and_an_absurd_one_rejected() -> None:
    assert check(decision(stop_loss=63700.04)).approved_order.stop_loss == D("63700.0")
    assert "order" in rules(check(decision(size_pct=0.0001)))  # 1 USDT is below one lot
    tiny = check(decision(stop_loss=0.04, take_profit=67600.0))
    assert "stop_loss" in rules(tiny) and "tick" in dict(tiny.failures)["stop_loss"]


def test_only_the_gate_can_build_an_approved_order() -> None:
    with pytest.raises(PermissionError):
        ApprovedOrder(kind="open", action="OPEN_LONG", inst_id=BTC, side="buy", pos_side="long", order_type="market",
                      size=D("1"), client_order_id="x", entry_reference=D("1"), leverage=D("1"))
