"""Market regime of one timeframe, from its indicator set (the seed's rule).

    slope     = EMA20[t] / EMA20[t-5] - 1          (IndicatorSet.ema20_slope)
    atr_ratio = ATR14[t] / mean(ATR14[t-49..t])    (IndicatorSet.atr_ratio)

Precedence (the seed's order, first match wins):
1. ADX14 > 25 and slope > 0  -> "trending_up"
   ADX14 > 25 and slope < 0  -> "trending_down"
   (ADX > 25 with a slope of exactly 0 is no trend: fall through)
2. atr_ratio > 1.5           -> "volatile"
3. otherwise                 -> "ranging"

"unknown" when an input the decision needs is missing: no ADX or no slope
(the trend test cannot be made), or, once the trend test has not matched,
no atr_ratio. A trend is reported even when atr_ratio is missing, because
step 1 does not need it.
"""
from __future__ import annotations

from market.schemas import IndicatorSet, Regime

ADX_TREND = 25.0
ATR_RATIO_VOLATILE = 1.5


def regime_detect(ind: IndicatorSet) -> Regime:
    if ind.adx_14 is None or ind.ema20_slope is None:
        return "unknown"
    if ind.adx_14 > ADX_TREND:
        if ind.ema20_slope > 0:
            return "trending_up"
        if ind.ema20_slope < 0:
            return "trending_down"
    if ind.atr_ratio is None:
        return "unknown"
    if ind.atr_ratio > ATR_RATIO_VOLATILE:
        return "volatile"
    return "ranging"
