"""The indicator set of one timeframe: every column for every candle, one pass.

`indicators_compute(df)` takes candles (UTC DatetimeIndex of open times, float
open/high/low/close/volume, oldest first) and returns a new frame with the same
index: the OHLCV columns plus one column per indicator (see COLUMNS). Values
that are not defined yet (warm-up, flat markets) are NaN; `indicator_set_at`
turns a row into an `IndicatorSet`, NaN/inf becoming None. Nothing raises on
short, empty, gappy or zero-volume input.

Conventions (the references in ../shared/data/indicator_refs are TA-Lib's and
our tests hold us to them within 1e-6 relative after warm-up):
- RSI(14), ATR(14), ADX/+DI/-DI(14): Wilder, TA-Lib seeding (`indicator_kernels`).
- MACD(12,26,9): TA-Lib's (EMAs seeded with SMAs, the fast EMA started so that
  both begin at bar 25; the signal EMA seeded with the SMA of 9 MACD values).
- Bollinger(20, 2): SMA20 +- 2 population standard deviations.
- EMA 20/50/200: seeded with the SMA of the first n closes.
- StochRSI(14,14,3,3): the TradingView / pandas-ta convention: raw = stochastic
  of RSI(14) over 14 bars (0..100), K = SMA3(raw), D = SMA3(K). (TA-Lib's
  STOCHRSI fastk/fastd is the unsmoothed variant; we do not use it.)
- OBV: TA-Lib's (starts at the first bar's volume), so it depends on where the
  data starts; only its changes carry meaning.
- VWAP: anchored to the UTC day (restarts at 00:00 UTC), typical price (h+l+c)/3,
  as pandas-ta's `vwap(anchor="D")`.
- Ichimoku(9,26,52), pandas-ta's convention, no chikou span (it is the close
  26 bars in the future). The senkou spans at bar t are the cloud drawn at t,
  i.e. computed from bars up to t-25: values known at t.
- Pivots: classic floor pivots (P, R1, R2, S1, S2) from the previous UTC day for
  timeframes under 4H, from the previous UTC week (Monday start) from 4H up.
- Fractals: the 3 most recent confirmed 5-bar fractal highs / lows within the
  last FRACTAL_LOOKBACK bars (a fractal is confirmed two bars after its centre).
- Volume profile over the last `profile_bars` bars (default
  settings.INDICATOR_HISTORY_CANDLES, i.e. the snapshot window): POC and the
  70% value area (VAH/VAL) on VP_BINS price bins.
- atr_ratio = ATR14 / SMA50(ATR14); ema20_slope = EMA20[t] / EMA20[t-5] - 1;
  bb_position = (close - lower) / (upper - lower); volume_vs_avg = volume /
  SMA20(volume); ema_alignment = +1 (EMA20 > EMA50 > EMA200), -1 (reverse),
  0 (mixed); macd_cross = +1 (MACD crossed above its signal on this bar:
  hist[t-1] <= 0 < hist[t]), -1 (crossed below), 0 (no cross).

Window dependence (what replay must know, see `market.snapshot`): every column
is a function of a bounded number of trailing bars, or converges to within
1e-9 relative once CONVERGED_AFTER_BARS bars have been seen, EXCEPT the columns
in WINDOW_DEPENDENT (EMA200 needs ~2,500 bars to converge that far; OBV is a
running sum): those must be recomputed on the same trailing window to match
a live computation exactly.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from datetime import timedelta

import numpy as np
import pandas as pd
from django.conf import settings

from market import indicator_kernels as k
from market.schemas import IndicatorSet

FRACTAL_LOOKBACK = 100
FRACTAL_COUNT = 3
VP_BINS = 50
VP_VALUE_AREA = 0.70
SLOPE_BARS = 5
CONVERGED_AFTER_BARS = 700
WINDOW_DEPENDENT = ("ema_200", "ema_alignment", "obv")
_WEEKLY_FROM = timedelta(hours=4)

COLUMNS: tuple[str, ...] = (
    "rsi_14", "macd", "macd_signal_line", "macd_hist", "bb_upper", "bb_middle", "bb_lower",
    "ema_20", "ema_50", "ema_200", "atr_14", "atr_ratio", "vwap", "adx_14", "plus_di", "minus_di",
    "stochrsi_k", "stochrsi_d", "obv", "ichimoku_tenkan", "ichimoku_kijun", "ichimoku_senkou_a",
    "ichimoku_senkou_b", "pivot", "pivot_r1", "pivot_r2", "pivot_s1", "pivot_s2",
    *(f"fractal_high_{n}" for n in range(1, FRACTAL_COUNT + 1)),
    *(f"fractal_low_{n}" for n in range(1, FRACTAL_COUNT + 1)),
    "vp_poc", "vp_vah", "vp_val", "ema20_slope", "bb_position", "ema_alignment", "macd_cross",
    "volume_vs_avg",
)
OHLCV = ("open", "high", "low", "close", "volume")
_ALIGNMENT = {1.0: "bullish", -1.0: "bearish", 0.0: "mixed"}
_CROSS = {1.0: "cross_up", -1.0: "cross_down", 0.0: "none"}


def bar_spacing(index: pd.DatetimeIndex) -> timedelta | None:
    """The timeframe of a candle index: its smallest step (gaps only make steps longer)."""
    if len(index) < 2:
        return None
    steps = np.diff(index.asi8)
    steps = steps[steps > 0]
    return timedelta(microseconds=int(steps.min()) // 1000) if steps.size else None


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    out[~np.isfinite(out)] = np.nan
    return out


def _sign_code(cond_pos: np.ndarray, cond_neg: np.ndarray, defined: np.ndarray) -> np.ndarray:
    out = np.where(cond_pos, 1.0, np.where(cond_neg, -1.0, 0.0))
    out[~defined] = np.nan
    return out


def _shift(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full(x.shape[0], np.nan)
    if n < x.shape[0]:
        out[n:] = x[: x.shape[0] - n]
    return out


def _clean(df: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(df.index, pd.DatetimeIndex):
        raise TypeError("indicators_compute needs a DatetimeIndex of candle open times")
    frame = df.loc[:, list(OHLCV)].astype("float64")
    if not frame.index.is_monotonic_increasing or frame.index.has_duplicates:
        frame = frame[~frame.index.duplicated(keep="last")].sort_index()
    if frame.index.tz is None:
        frame.index = frame.index.tz_localize("UTC")
    return frame


def ema_alignment_code(e20: np.ndarray, e50: np.ndarray, e200: np.ndarray) -> np.ndarray:
    defined = ~(np.isnan(e20) | np.isnan(e50) | np.isnan(e200))
    return _sign_code((e20 > e50) & (e50 > e200), (e20 < e50) & (e50 < e200), defined)


def indicators_compute(df: pd.DataFrame, *, profile_bars: int | None = None, tail: int | None = None,
                       bar: timedelta | None = None) -> pd.DataFrame:
    """Every indicator column (COLUMNS) for every candle of `df`, plus OHLCV.

    `tail` limits the volume profile (the one costly rolling column) to the
    last `tail` rows; other rows get NaN there. Default: every row.
    `bar` is the timeframe (it picks daily or weekly pivots); default: the
    index's smallest step.
    """
    frame = _clean(df)
    o, h, lo, c, v = (np.ascontiguousarray(frame[name].to_numpy()) for name in OHLCV)
    size = c.shape[0]
    out: dict[str, np.ndarray] = {}

    out["rsi_14"] = k.rsi(c, 14)
    slow = k.ema(c, 26)
    fast = k.ema_from(c, 12, 26 - 12)
    line = fast - slow
    signal = k.ema_from(line, 9, 25)
    line[np.isnan(signal)] = np.nan  # TA-Lib prints the line only once the signal exists
    out["macd"], out["macd_signal_line"], out["macd_hist"] = line, signal, line - signal
    out["bb_upper"], out["bb_middle"], out["bb_lower"] = k.bbands(c, 20, 2.0)
    for n in (20, 50, 200):
        out[f"ema_{n}"] = k.ema(c, n)
    atr = k.atr(h, lo, c, 14)
    out["atr_14"] = atr
    out["atr_ratio"] = _ratio(atr, k.sma(atr, 50))

    days = frame.index.asi8 // 86_400_000_000_000 if size else np.zeros(0, dtype=np.int64)
    out["vwap"] = k.anchored_vwap(h, lo, c, v, days)
    out["plus_di"], out["minus_di"], out["adx_14"] = k.adx(h, lo, c, 14)
    raw = k.stoch_of(out["rsi_14"], 14)
    out["stochrsi_k"] = k.sma(raw, 3)
    out["stochrsi_d"] = k.sma(out["stochrsi_k"], 3)
    out["obv"] = k.obv(c, v)

    tenkan, kijun = k.midprice(h, lo, 9), k.midprice(h, lo, 26)
    out["ichimoku_tenkan"], out["ichimoku_kijun"] = tenkan, kijun
    out["ichimoku_senkou_a"] = _shift((tenkan + kijun) / 2.0, 25)
    out["ichimoku_senkou_b"] = _shift(k.midprice(h, lo, 52), 25)

    spacing = bar or bar_spacing(frame.index)
    weekly = spacing is not None and spacing >= _WEEKLY_FROM
    # Epoch day 0 was a Thursday: +3 makes weeks start on Monday.
    period = (days + 3) // 7 if weekly else days
    piv = k.previous_period_pivots(h, lo, c, period)
    for col, name in enumerate(("pivot", "pivot_r1", "pivot_r2", "pivot_s1", "pivot_s2")):
        out[name] = piv[:, col]
    highs, lows = k.recent_fractals(h, lo, FRACTAL_COUNT, FRACTAL_LOOKBACK)
    for n in range(FRACTAL_COUNT):
        out[f"fractal_high_{n + 1}"] = highs[:, n]
        out[f"fractal_low_{n + 1}"] = lows[:, n]

    window = int(profile_bars or settings.INDICATOR_HISTORY_CANDLES)
    first_row = 0 if tail is None else size - tail
    vp = k.volume_profile(h, lo, c, v, window, VP_BINS, VP_VALUE_AREA, first_row)
    out["vp_poc"], out["vp_vah"], out["vp_val"] = vp[:, 0], vp[:, 1], vp[:, 2]

    e20 = out["ema_20"]
    out["ema20_slope"] = _ratio(e20, _shift(e20, SLOPE_BARS)) - 1.0
    out["bb_position"] = _ratio(c - out["bb_lower"], out["bb_upper"] - out["bb_lower"])
    out["ema_alignment"] = ema_alignment_code(e20, out["ema_50"], out["ema_200"])
    hist, prev = out["macd_hist"], _shift(out["macd_hist"], 1)
    defined = ~(np.isnan(hist) | np.isnan(prev))
    out["macd_cross"] = _sign_code((prev <= 0) & (hist > 0), (prev >= 0) & (hist < 0), defined)
    out["volume_vs_avg"] = _ratio(v, k.sma(v, 20))

    # One 2-D block: inserting 47 columns one by one costs more than every indicator together.
    block = np.empty((size, len(OHLCV) + len(COLUMNS)))
    for j, column in enumerate((o, h, lo, c, v, *(out[name] for name in COLUMNS))):
        block[:, j] = column
    return pd.DataFrame(block, index=frame.index, columns=[*OHLCV, *COLUMNS])


def _num(row: Mapping[str, float], name: str) -> float | None:
    value = row.get(name)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# The price levels support and resistance are chosen from.
_LEVEL_NAMES = ("pivot", "pivot_r1", "pivot_r2", "pivot_s1", "pivot_s2",
                *(f"fractal_{side}_{n}" for side in ("high", "low") for n in range(1, FRACTAL_COUNT + 1)))


def _levels(values: Mapping[str, float], close: float | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Support below the close and resistance above it, nearest first, at most 5 each."""
    if close is None:
        return (), ()
    levels = _distinct_levels(tuple(x for name in _LEVEL_NAMES if (x := values.get(name)) is not None))
    below = [x for x in levels if x < close]
    support = tuple(below[::-1][:5])
    resistance = tuple([x for x in levels if x > close][:5])
    return support, resistance


def _distinct_levels(raw: tuple[float, ...]) -> tuple[float, ...]:
    """The levels rounded to 10 digits, without repeats, ascending."""
    # 0.0 and -0.0 are equal keys: the cache could answer one with the other's sign.
    return _distinct_levels_cached(raw) if 0.0 not in raw else tuple(sorted({round(x, 10) for x in raw}))


@functools.lru_cache(maxsize=1024)
def _distinct_levels_cached(raw: tuple[float, ...]) -> tuple[float, ...]:
    # Remembered: a row's pivots hold for a day or a week and its fractals for many bars, so
    # consecutive rows mostly repeat them, and round() with digits is the dearest step here.
    return tuple(sorted({round(x, 10) for x in raw}))


def indicator_set_at(computed: pd.DataFrame, i: int = -1) -> IndicatorSet:
    """The `IndicatorSet` of row `i` of an `indicators_compute` frame (None where undefined)."""
    if computed.empty or not -len(computed) <= i < len(computed):
        return IndicatorSet()
    return indicator_set_from_row(computed.iloc[i].to_dict())


# The IndicatorSet fields taken from the row as they are (the two coded signals are mapped to names).
_PLAIN_FIELDS = tuple(
    name for name in COLUMNS if name in IndicatorSet.model_fields and name not in ("ema_alignment", "macd_signal")
)
# Every column an IndicatorSet reads.
_USED_COLUMNS = tuple(dict.fromkeys(("close", *_LEVEL_NAMES, *_PLAIN_FIELDS, "ema_alignment", "macd_cross")))
# Every field set (to None): the template `indicator_set_from_finite` copies with all its fields replaced.
_ALL_UNSET = IndicatorSet.model_construct(**dict.fromkeys(IndicatorSet.model_fields))


def indicator_set_from_row(row: Mapping[str, float]) -> IndicatorSet:
    """The `IndicatorSet` of one `indicators_compute` row given as {column: value}."""
    return indicator_set_from_finite({name: x for name in _USED_COLUMNS if (x := _num(row, name)) is not None})


def indicator_set_from_finite(values: Mapping[str, float]) -> IndicatorSet:
    """`indicator_set_from_row` of a row given as its finite values only, as floats (a missing column is undefined).

    The replay's `TimeframeSeries` makes that mapping with numpy (`np.isfinite` over the row).
    """
    get = values.get
    close = get("close")
    support, resistance = _levels(values, close)
    alignment = get("ema_alignment")
    cross = get("macd_cross")
    # No validation: every value is already what validation would make of it (a finite float or
    # None, tuples of floats, a Literal name or None), and this runs for every timeframe of every
    # snapshot (a replay year: ~46,000 times). model_copy(update=) of a template whose fields are all
    # set gives what model_construct with every field would (same field order, every field set) at
    # a third of its cost. tests/market prove the equality with the validated model.
    return _ALL_UNSET.model_copy(update={
        "close": close,
        **{name: get(name) for name in _PLAIN_FIELDS},
        "support": support,
        "resistance": resistance,
        "ema_alignment": _ALIGNMENT.get(alignment) if alignment is not None else None,
        "macd_signal": _CROSS.get(cross) if cross is not None else None,
    })
