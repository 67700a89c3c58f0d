"""Regime detection on constructed indicator sets (the seed's rule and precedence)."""
from __future__ import annotations

import pytest

from market.regime import regime_detect
from market.schemas import IndicatorSet


@pytest.mark.parametrize(
    ("adx", "slope", "ratio", "expected"),
    [
        (30.0, 0.002, 1.0, "trending_up"),
        (30.0, -0.002, 1.0, "trending_down"),
        (30.0, 0.002, 2.0, "trending_up"),  # a trend wins over volatility (seed order)
        (30.0, -0.01, None, "trending_down"),  # the trend test does not need the ATR ratio
        (25.0, 0.01, 1.0, "ranging"),  # ADX must be strictly above 25
        (30.0, 0.0, 1.0, "ranging"),  # a flat EMA is no trend
        (20.0, 0.01, 1.6, "volatile"),
        (20.0, 0.01, 1.5, "ranging"),  # strictly above 1.5
        (30.0, 0.0, 1.8, "volatile"),
        (10.0, -0.01, 0.7, "ranging"),
        (None, 0.01, 2.0, "unknown"),
        (30.0, None, 1.0, "unknown"),
        (20.0, 0.01, None, "unknown"),
    ],
)
def test_regime_follows_the_seed_rule(adx: float | None, slope: float | None, ratio: float | None,
                                      expected: str) -> None:
    assert regime_detect(IndicatorSet(adx_14=adx, ema20_slope=slope, atr_ratio=ratio)) == expected


def test_an_empty_indicator_set_is_unknown() -> None:
    assert regime_detect(IndicatorSet()) == "unknown"
