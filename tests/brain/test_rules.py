"""The rules brain: deterministic, inside the risk limits, managing and learning."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from django.conf import settings as dj

from brain.playbook import playbook_default
from brain.playbook_schema import playbook_validate
from brain.rules import RulesBrain
from brain.schemas import Action, BrainContext, TradeView
from tests.brain import factories as f


@pytest.fixture
def brain() -> RulesBrain:
    return RulesBrain(playbook=playbook_default(), playbook_version=1)


def assert_within_limits(decision, price: float) -> None:
    d = decision.decision
    sign = 1 if d.action == Action.OPEN_LONG else -1
    risk = sign * (price - d.stop_loss)
    reward = sign * (d.take_profit - price)
    assert risk > 0 and reward > 0, "stop and target on the right sides"
    assert risk / price <= float(dj.MAX_SL_DISTANCE_PCT)
    assert reward / risk >= float(dj.MIN_RR_RATIO)
    assert 0 < d.size_pct <= float(dj.MAX_SINGLE_TRADE_PCT) and 1 <= d.leverage <= float(dj.MAX_LEVERAGE)


@pytest.mark.parametrize("build, action, strategy", [
    (f.pullback_long, Action.OPEN_LONG, "trend_pullback"),
    (f.breakout_long, Action.OPEN_LONG, "momentum_breakout"),
    (f.range_short, Action.OPEN_SHORT, "range_mean_reversion"),
])
def test_each_strategy_opens_inside_the_risk_limits(brain, build, action, strategy):
    snapshot = build()
    decision = brain.decide(snapshot=snapshot, context=f.context())
    assert (decision.action, decision.strategy_used) == (action, strategy)
    assert_within_limits(decision, float(snapshot.price))
    assert brain.screen(snapshot=snapshot, context=f.context()).signal


def test_it_is_deterministic(brain):
    snapshot = f.pullback_long()
    first = brain.decide(snapshot=snapshot, context=f.context())
    again = RulesBrain(playbook=playbook_default(), playbook_version=1).decide(snapshot=snapshot, context=f.context())
    assert first == again and first.model_dump_json() == again.model_dump_json()


def test_a_huge_atr_is_clamped_to_the_stop_limit_with_the_reward_kept(brain):
    snapshot = f.snapshot(m15={"rsi_14": 48.0, "ema_20": 69990.0, "atr_14": 900.0}, h1={"atr_14": 5000.0})
    decision = brain.decide(snapshot=snapshot, context=f.context())
    assert decision.action == Action.OPEN_LONG
    assert_within_limits(decision, 70000.0)


def test_no_setup_is_a_hold_and_no_signal(brain):
    snapshot = f.snapshot(regime="ranging", h1={"adx_14": 15.0})
    assert brain.decide(snapshot=snapshot, context=f.context()).action == Action.HOLD
    assert not brain.screen(snapshot=snapshot, context=f.context()).signal


def test_a_disabled_strategy_does_not_trade():
    data = playbook_default()
    data["strategy_definitions"]["trend_pullback"]["params"]["enabled"] = False
    assert RulesBrain(playbook=data).decide(snapshot=f.pullback_long(), context=f.context()).action == Action.HOLD


def test_it_closes_a_long_when_the_regime_flips(brain):
    context = f.context(positions=[f.long_position()])
    held = brain.decide(snapshot=f.pullback_long(), context=context)
    assert held.action == Action.HOLD and "managing" in held.reasoning
    flipped = brain.decide(snapshot=f.snapshot(regime="trending_down", h1={"ema_alignment": "bearish"}), context=context)
    assert flipped.action == Action.CLOSE and "flipped" in flipped.reasoning


def test_it_closes_a_failed_breakout(brain):
    context = f.context(positions=[f.long_position("momentum_breakout")])
    snapshot = f.snapshot(m15={"close": 69800.0, "bb_middle": 70000.0})
    assert brain.decide(snapshot=snapshot, context=context).action == Action.CLOSE


def test_no_new_position_beyond_the_concurrent_limit(brain):
    others = [f.long_position().model_copy(update={"inst_id": f"X{i}-USDT-SWAP"}) for i in range(3)]
    assert brain.decide(snapshot=f.pullback_long(), context=f.context(positions=others)).action == Action.HOLD


# --- reflection -------------------------------------------------------------------------


def trade(i: int, strategy: str, pnl: str, exit_reason: str = "stop_loss", confidence: str = "0.65") -> TradeView:
    opened = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(hours=i)
    return TradeView(id=i, inst_id="BTC-USDT-SWAP", direction="LONG", opened_at=opened, closed_at=opened + timedelta(minutes=90),
                     entry_price=Decimal("70000"), exit_price=Decimal("70100"), stop_loss=Decimal("69000"),
                     pnl_usd=Decimal(pnl), strategy_used=strategy, exit_reason=exit_reason,
                     confidence_at_entry=Decimal(confidence), market_regime="trending_up")


def test_reflection_switches_off_a_losing_strategy_citing_its_trades(brain):
    losers = [trade(i, "momentum_breakout", "-10") for i in range(1, 6)] + [trade(6, "momentum_breakout", "5", "take_profit")]
    winners = [trade(i, "trend_pullback", "20", "take_profit") for i in range(10, 14)] + [trade(14, "trend_pullback", "-8")]
    result = brain.reflect(trades=losers + winners, playbook=playbook_default())
    playbook_validate(result.updated_playbook)
    off = [c for c in result.changes if c.path.endswith("momentum_breakout.params.enabled")]
    assert off and off[0].new == "False" and off[0].evidence_trade_ids == [1, 2, 3, 4, 5, 6]
    assert result.updated_playbook["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] is False
    grow = [c for c in result.changes if c.path.endswith("trend_pullback.params.size_pct")]
    assert grow and float(grow[0].new) > float(grow[0].old) and grow[0].evidence_trade_ids == [10, 11, 12, 13, 14]
    assert result.updated_playbook["lessons_learned"] and sorted(result.trade_ids) == sorted(t.id for t in losers + winners)
    assert result.updated_playbook["confidence_calibration"]["0.6-0.7"]["trades"] == 11
    # The new playbook really changes what the rules brain does.
    assert RulesBrain(playbook=result.updated_playbook).decide(snapshot=f.breakout_long(), context=f.context()).action == Action.HOLD
    assert brain.reflect(trades=losers + winners, playbook=playbook_default()) == result  # deterministic


def test_reflection_tightens_a_marginal_strategy_and_leaves_a_small_sample_alone(brain):
    mixed = [trade(i, "trend_pullback", "-10") for i in range(1, 4)] + [trade(i, "trend_pullback", "12", "take_profit") for i in (4, 5)]
    result = brain.reflect(trades=mixed + [trade(9, "range_mean_reversion", "-50")], playbook=playbook_default())
    paths = {c.path for c in result.changes}
    assert "strategy_definitions.trend_pullback.params.size_pct" in paths
    assert "strategy_definitions.trend_pullback.params.adx_min" in paths
    assert "strategy_definitions.trend_pullback.params.stop_atr_mult" in paths  # all losses were stop-outs
    assert not any("range_mean_reversion" in p for p in paths)  # 1 trade < min_trades


def test_a_switched_off_strategy_comes_back_on_probation(brain):
    data = playbook_default()
    data["strategy_definitions"]["momentum_breakout"]["params"].update(enabled=False, disabled_reflections=0)
    for _ in range(3):
        data = brain.reflect(trades=[], playbook=data).updated_playbook
    params = data["strategy_definitions"]["momentum_breakout"]["params"]
    assert params["enabled"] is True and params["size_pct"] == 0.015


def test_review_trade(brain):
    review = brain.review_trade(trade=trade(1, "trend_pullback", "-10"))
    assert review.outcome == "loss" and review.should_update_playbook


# --- real BTC data ----------------------------------------------------------------------


def _frame(path, start, end):
    import pandas as pd

    df = pd.read_csv(path)
    df["ts"] = pd.to_datetime(df["ts"], unit="ms", utc=True)
    df = df.set_index("ts")[["open", "high", "low", "close", "volume"]].astype(float)
    return df[(df.index >= start) & (df.index < end)]


@pytest.mark.django_db
def test_stops_and_targets_pass_the_risk_gate_on_real_btc_snapshots(shared_data, brain):
    import pandas as pd

    from execution.exchanges.base import AccountState
    from execution.risk import BotStateView, MarketRef, risk_check
    from market.indicators import indicators_compute
    from market.snapshot import snapshot_from_frames

    start, end = pd.Timestamp("2025-04-20", tz="UTC"), pd.Timestamp("2025-07-01", tz="UTC")
    frames = {
        "15m": _frame(shared_data / "okx_BTC-USDT-SWAP_15m.csv.gz", start, end),
        "1H": _frame(shared_data / "okx_BTC-USDT-SWAP_1H.csv", start - pd.Timedelta(days=20), end),
        "4H": _frame(shared_data / "okx_BTC-USDT-SWAP_4H.csv", start - pd.Timedelta(days=60), end),
    }
    computed = {tf: indicators_compute(df) for tf, df in frames.items()}
    equity = Decimal("10000")
    account_state = AccountState(equity=equity, available_balance=equity, day_start_equity=equity, peak_equity=equity)
    seen: Counter[str] = Counter()
    as_of = datetime(2025, 5, 1, tzinfo=timezone.utc)
    while as_of < datetime(2025, 6, 30, tzinfo=timezone.utc):
        snapshot = snapshot_from_frames(inst_id="BTC-USDT-SWAP", as_of=as_of, source="replay", candles=frames, computed=computed, window=300)
        decision = brain.decide(snapshot=snapshot, context=BrainContext(account=f.account(), now=as_of))
        assert decision == brain.decide(snapshot=snapshot, context=BrainContext(account=f.account(), now=as_of))
        if decision.action in (Action.OPEN_LONG, Action.OPEN_SHORT):
            seen[decision.strategy_used] += 1
            assert_within_limits(decision, float(snapshot.price))
            verdict = risk_check(decision=decision, market=MarketRef(last=snapshot.price, inst_id=snapshot.inst_id, ts=as_of),
                                 account=account_state, positions=[], bot=BotStateView(), now=as_of)
            assert verdict.approved, (as_of, decision.decision, verdict.failures)
        as_of += timedelta(minutes=290)
    assert len(seen) >= 2 and sum(seen.values()) >= 20, seen
