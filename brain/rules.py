"""The rules brain: a deterministic policy driven by the playbook's parameters.

Same interface as the Claude brain (screen, decide, review a trade, reflect),
no network, no randomness: the same snapshot, context and playbook always give
the same decision. Entries come from the playbook's machine-readable
strategies (trend pullback to EMA20, momentum breakout on volume, range mean
reversion at Bollinger/RSI extremes); stops and targets are ATR multiples,
kept inside the risk gate's limits (read from settings, never changed here):
stop distance at most 90% of MAX_SL_DISTANCE_PCT, reward:risk at least 110%
of MIN_RR_RATIO, size and leverage capped. Its reflection measures each
strategy on the trades it is given and adjusts or switches it, citing trade ids.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings

from brain.playbook_schema import Playbook, Strategy, playbook_validate
from brain.schemas import (
    Action, Analysis, BrainContext, DeepReflection, Decision, PositionView, ResearchResult,
    ScreenResult, TradeDecision, TradeReview, TradeView,
)
from market.schemas import IndicatorSet, MarketSnapshot

SL_LIMIT_SHARE = 0.9  # use at most 90% of the allowed stop distance
RR_MARGIN = 1.1  # aim 10% above the minimum reward:risk
MIN_STOP_PCT = 0.002  # a stop closer than 0.2% is noise plus fees


@dataclass(frozen=True)
class Setup:
    strategy: str
    side: str  # long / short
    why: str


def _ind(snapshot: MarketSnapshot, tf: str) -> IndicatorSet:
    view = snapshot.timeframes.get(tf)
    return view.indicators if view else IndicatorSet()


def _n(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _between(value: float | None, low: float | None, high: float | None) -> bool:
    if value is None:
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _entry(name: str, strategy: Strategy, snapshot: MarketSnapshot) -> Setup | None:
    p = strategy.params
    if not p.enabled or snapshot.regime not in p.regimes:
        return None
    m15, h1 = _ind(snapshot, "15m"), _ind(snapshot, "1H")
    sides: list[str] = []
    if p.signal == "trend_pullback":
        if p.adx_min is not None and not (h1.adx_14 is not None and h1.adx_14 >= p.adx_min):
            return None
        if None in (m15.close, m15.ema_20, m15.atr_14) or p.pullback_atr is None:
            return None
        near = abs(m15.close - m15.ema_20) <= p.pullback_atr * m15.atr_14  # type: ignore[operator]
        if snapshot.regime == "trending_up" and near and h1.ema_alignment != "bearish" and _between(m15.rsi_14, p.rsi_long_min, p.rsi_long_max):
            sides.append("long")
        if snapshot.regime == "trending_down" and near and h1.ema_alignment != "bullish" and _between(m15.rsi_14, p.rsi_short_min, p.rsi_short_max):
            sides.append("short")
        why = f"pullback to 15m EMA20 ({_n(m15.ema_20)}) in a 1H {snapshot.regime}, ADX1H {_n(h1.adx_14, 1)}, RSI15m {_n(m15.rsi_14, 1)}"
    elif p.signal == "momentum_breakout":
        if p.adx_min is not None and not (h1.adx_14 is not None and h1.adx_14 >= p.adx_min):
            return None
        if None in (m15.close, m15.bb_upper, m15.bb_lower, m15.macd_hist, m15.volume_vs_avg):
            return None
        if p.volume_min is not None and m15.volume_vs_avg < p.volume_min:  # type: ignore[operator]
            return None
        if m15.close > m15.bb_upper and m15.macd_hist > 0 and _between(m15.rsi_14, p.rsi_long_min, p.rsi_long_max):  # type: ignore[operator]
            sides.append("long")
        if m15.close < m15.bb_lower and m15.macd_hist < 0 and _between(m15.rsi_14, p.rsi_short_min, p.rsi_short_max):  # type: ignore[operator]
            sides.append("short")
        why = f"15m close outside the Bollinger band on {_n(m15.volume_vs_avg)}x volume, MACD hist {_n(m15.macd_hist)}, RSI15m {_n(m15.rsi_14, 1)}"
    else:  # range_mean_reversion
        if p.adx_max is not None and not (h1.adx_14 is not None and h1.adx_14 <= p.adx_max):
            return None
        if m15.bb_position is None or m15.rsi_14 is None:
            return None
        if p.bb_long_max is not None and m15.bb_position <= p.bb_long_max and _between(m15.rsi_14, p.rsi_long_min, p.rsi_long_max):
            sides.append("long")
        if p.bb_short_min is not None and m15.bb_position >= p.bb_short_min and _between(m15.rsi_14, p.rsi_short_min, p.rsi_short_max):
            sides.append("short")
        why = f"range extreme: BB position {_n(m15.bb_position)}, RSI15m {_n(m15.rsi_14, 1)}, ADX1H {_n(h1.adx_14, 1)}"
    sides = [s for s in sides if p.direction in ("both", s)]
    return Setup(strategy=name, side=sides[0], why=why) if len(sides) == 1 else None


def _ordered(playbook: Playbook, regime: str) -> list[str]:
    rule = playbook.market_regime_rules.get(regime)  # type: ignore[call-overload]
    avoid = set(rule.avoid_strategies) if rule else set()
    preferred = list(rule.preferred_strategies) if rule else []
    rest = [n for n in playbook.strategy_definitions if n not in preferred]
    return [n for n in [*preferred, *rest] if n not in avoid]


def _round_price(value: float, reference: float) -> float:
    digits = max(0, 6 - int(math.floor(math.log10(abs(reference)))) - 1) if reference else 8
    return round(value, digits)


class RulesBrain:
    name = "rules"

    def __init__(self, *, playbook: dict | None = None, playbook_version: int | None = None) -> None:
        if playbook is None:
            from brain.playbook import playbook_current

            current = playbook_current()
            playbook, playbook_version = current.playbook, current.version
        self.playbook = playbook_validate(playbook)
        self.playbook_version = playbook_version

    # --- screening ------------------------------------------------------
    def screen(self, *, snapshot: MarketSnapshot, context: BrainContext, cycle_id: int | None = None, mode: str = "live") -> ScreenResult:
        setups = self._setups(snapshot)
        if not setups:
            return ScreenResult(signal=False, reason=f"no playbook setup in a {snapshot.regime} market")
        return ScreenResult(signal=True, reason=f"{setups[0].strategy} {setups[0].side}: {setups[0].why}"[:2000])

    def _setups(self, snapshot: MarketSnapshot) -> list[Setup]:
        setups = []
        for name in _ordered(self.playbook, snapshot.regime):
            setup = _entry(name, self.playbook.strategy_definitions[name], snapshot)
            if setup is not None:
                setups.append(setup)
        return setups

    # --- deciding -------------------------------------------------------
    def decide(self, *, snapshot: MarketSnapshot, context: BrainContext, research: ResearchResult | None = None,
               cycle_id: int | None = None, mode: str = "live") -> Decision:
        # `research` is deliberately unused: the rules brain trades on prices, not on text.
        symbol = snapshot.inst_id
        open_here = context.positions_for(symbol)
        if open_here:
            return self._manage(snapshot, open_here[0])
        if snapshot.ts.hour in self.playbook.time_filters.avoid_hours_utc:
            return Decision.hold(symbol, f"hour {snapshot.ts.hour} UTC is in the playbook's avoid_hours_utc")
        if len(context.positions) >= settings.MAX_CONCURRENT_POSITIONS:
            return Decision.hold(symbol, f"already {len(context.positions)} open positions (max {settings.MAX_CONCURRENT_POSITIONS})")
        for setup in self._setups(snapshot):
            decision = self._open(snapshot, context, setup)
            if decision is not None:
                return decision
        return Decision.hold(symbol, f"no playbook setup in a {snapshot.regime} market")

    def _open(self, snapshot: MarketSnapshot, context: BrainContext, setup: Setup) -> Decision | None:
        strategy = self.playbook.strategy_definitions[setup.strategy]
        p = strategy.params
        atr = _ind(snapshot, p.atr_timeframe).atr_14 or _ind(snapshot, "1H").atr_14
        price = float(snapshot.price)
        if not atr or atr <= 0 or price <= 0:
            return None
        max_stop = float(settings.MAX_SL_DISTANCE_PCT) * SL_LIMIT_SHARE * price
        stop_dist = min(max(p.stop_atr_mult * atr, MIN_STOP_PCT * price), max_stop)
        if stop_dist < MIN_STOP_PCT * price:
            return None  # the gate's stop limit is tighter than noise: no sane trade
        target_dist = max(p.target_atr_mult * atr, stop_dist * float(settings.MIN_RR_RATIO) * RR_MARGIN)
        sign = 1 if setup.side == "long" else -1
        stop = _round_price(price - sign * stop_dist, price)
        target = _round_price(price + sign * target_dist, price)
        if setup.side == "short" and target <= 0:
            return None
        rule = self.playbook.market_regime_rules.get(snapshot.regime)  # type: ignore[call-overload]
        size = min(p.size_pct, rule.max_position_pct if rule else p.size_pct, float(settings.MAX_SINGLE_TRADE_PCT))
        if context.account is not None and context.account.equity > 0:
            used = sum(float(pos.notional_usd) for pos in context.positions) / float(context.account.equity)
            size = min(size, float(settings.MAX_TOTAL_EXPOSURE_PCT) - used)
        if size <= 0.001:
            return None
        leverage = min(p.leverage, float(settings.MAX_LEVERAGE))
        rr = target_dist / stop_dist
        return Decision(
            analysis=Analysis(
                market_regime=snapshot.regime,
                bias="bullish" if setup.side == "long" else "bearish",
                key_observations=[setup.why],
                risk_factors=[f"stop {stop_dist / price:.2%} away ({p.stop_atr_mult} ATR {p.atr_timeframe})"],
            ),
            decision=TradeDecision(
                action=Action.OPEN_LONG if setup.side == "long" else Action.OPEN_SHORT,
                symbol=snapshot.inst_id, size_pct=round(size, 4), order_type="market", entry_price=price,
                stop_loss=stop, take_profit=target, leverage=leverage,
            ),
            confidence=p.confidence,
            strategy_used=setup.strategy,
            reasoning=f"rules brain, playbook v{self.playbook_version}: {setup.strategy} {setup.side}; {setup.why}; R:R {rr:.2f}",
        )

    def _manage(self, snapshot: MarketSnapshot, position: PositionView) -> Decision:
        symbol, long = snapshot.inst_id, position.side == "long"
        m15, h1 = _ind(snapshot, "15m"), _ind(snapshot, "1H")
        against_regime = "trending_down" if long else "trending_up"
        reason = ""
        if snapshot.regime == against_regime:
            reason = f"1H regime flipped to {snapshot.regime} against the {position.side}"
        elif position.strategy_used == "momentum_breakout" and m15.close is not None and m15.bb_middle is not None:
            if (long and m15.close < m15.bb_middle) or (not long and m15.close > m15.bb_middle):
                reason = "breakout failed: 15m close back through the middle band"
        elif position.strategy_used == "range_mean_reversion" and m15.bb_position is not None:
            if (long and m15.bb_position >= 0.95) or (not long and m15.bb_position <= 0.05):
                reason = "mean reversion complete: price reached the opposite band"
        elif h1.ema_alignment == ("bearish" if long else "bullish"):
            reason = f"1H EMAs aligned {h1.ema_alignment} against the {position.side}"
        if reason:
            return Decision(
                decision=TradeDecision(action=Action.CLOSE, symbol=symbol),
                analysis=Analysis(market_regime=snapshot.regime, key_observations=[reason]),
                confidence=0.7, strategy_used=position.strategy_used, reasoning=f"rules brain exit: {reason}",
            )
        return Decision.hold(symbol, f"managing open {position.side}: no exit condition")

    # --- reviewing and reflecting ----------------------------------------
    def review_trade(self, *, trade: TradeView, cycle_id: int | None = None, mode: str = "live") -> TradeReview:
        pnl = trade.pnl_usd or Decimal(0)
        outcome = "win" if pnl > 0 else "loss" if pnl < 0 else "breakeven"
        reason = trade.exit_reason or "unknown"
        right, wrong = [], []
        if trade.stop_loss is not None:
            right.append("a stop loss was in place")
        if reason == "take_profit":
            right.append("the target was reached")
        if reason == "stop_loss":
            wrong.append(f"{trade.strategy_used or 'the setup'} failed in a {trade.market_regime or 'unknown'} market")
        if reason == "liquidation":
            wrong.append("the position was liquidated")
        quality = "poor" if reason == "liquidation" else "good" if reason in ("take_profit", "stop_loss", "signal") else "acceptable"
        return TradeReview(
            outcome=outcome, execution_quality=quality,
            entry_timing="good" if outcome == "win" else "early" if reason == "stop_loss" else "good",
            exit_timing="good" if reason in ("take_profit", "stop_loss") else "early" if outcome == "loss" else "good",
            what_went_right=right, what_went_wrong=wrong,
            lesson=f"{trade.strategy_used or 'unknown strategy'} in {trade.market_regime or 'unknown'}: {outcome} via {reason}",
            should_update_playbook=outcome == "loss" and reason in ("stop_loss", "liquidation"),
            playbook_suggestion=None,
        )

    def reflect(self, *, trades: list[TradeView], playbook: dict | None = None, version: int | None = None,
                performance: dict | None = None, cycle_id: int | None = None, mode: str = "live") -> DeepReflection:
        from brain.reflection_rules import rules_reflect

        return rules_reflect(trades=trades, playbook=playbook or self.playbook.model_dump(mode="json"))
