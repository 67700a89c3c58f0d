"""Numba kernels behind `market.indicators`: one loop per indicator, TA-Lib conventions.

Why our own loops instead of pandas-ta's: pandas-ta 0.4.71b0 without TA-Lib
installed (it is not: TA-Lib needs a C library) follows other conventions than
the references we test against (RSI/ADX/ATR seeded from the first bar, sample
std-dev Bollinger bands, OBV starting at 0) and a one-pass `df.ta.study` costs
~20 ms per timeframe, 60 ms for three: over the 40 ms snapshot budget by
itself. These kernels reproduce TA-Lib's definitions exactly (seeding included)
and cost microseconds. Conventions, per kernel:

- EMA(n): seeded with the SMA of the first n values (first value at n-1), then
  ema += (x - ema) * 2/(n+1).
- RSI(n): Wilder; average gain/loss seeded with the mean of the first n changes
  (first value at index n). Where gain + loss is 0 (a completely flat memory,
  e.g. an exchange outage filled with flat bars) RSI is undefined: NaN, where
  TA-Lib would print 0 ("extremely oversold"), which would mislead the brain.
- ATR(n): Wilder; first value at index n = mean of TR[1..n].
- +DI/-DI/ADX(n): Wilder sums as in TA-Lib's ta_ADX.c (DM rule: +DM when
  up-move > down-move and > 0), first DI at n, first ADX at 2n-1. A DX that
  cannot be computed (no range) leaves the ADX unchanged, like TA-Lib.
- Stochastic of RSI: raw = (rsi - min_n) / (max_n - min_n) * 100; NaN when
  max == min (TA-Lib prints 0).

Every kernel writes NaN where the value is not defined yet; `NaN` inputs are
not expected (candles are complete rows).
"""
from __future__ import annotations

import numpy as np
from numba import njit

# TA-Lib treats |v| < 1e-8 as zero (TA_IS_ZERO).
_ZERO = 1e-8


@njit(cache=True)
def ema(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full(x.shape[0], np.nan)
    if x.shape[0] < n:
        return out
    k = 2.0 / (n + 1)
    acc = 0.0
    for i in range(n):
        acc += x[i]
    prev = acc / n
    out[n - 1] = prev
    for i in range(n, x.shape[0]):
        prev = prev + (x[i] - prev) * k
        out[i] = prev
    return out


@njit(cache=True)
def ema_from(x: np.ndarray, n: int, start: int) -> np.ndarray:
    """EMA(n) over x[start:], seeded with the SMA of x[start:start+n]; NaN before."""
    out = np.full(x.shape[0], np.nan)
    if x.shape[0] - start < n:
        return out
    out[start:] = ema(x[start:], n)
    return out


@njit(cache=True)
def sma(x: np.ndarray, n: int) -> np.ndarray:
    # Direct summation per window: exact, and no drift from a running sum.
    out = np.full(x.shape[0], np.nan)
    for i in range(n - 1, x.shape[0]):
        acc = 0.0
        ok = True
        for j in range(i - n + 1, i + 1):
            v = x[j]
            if v != v:
                ok = False
                break
            acc += v
        if ok:
            out[i] = acc / n
    return out


@njit(cache=True)
def bbands(x: np.ndarray, n: int, k: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SMA(n) +- k population standard deviations (ddof=0, as TA-Lib and StockCharts)."""
    size = x.shape[0]
    up = np.full(size, np.nan)
    mid = np.full(size, np.nan)
    low = np.full(size, np.nan)
    for i in range(n - 1, size):
        acc = 0.0
        for j in range(i - n + 1, i + 1):
            acc += x[j]
        mean = acc / n
        var = 0.0
        for j in range(i - n + 1, i + 1):
            d = x[j] - mean
            var += d * d
        sd = np.sqrt(var / n)
        mid[i] = mean
        up[i] = mean + k * sd
        low[i] = mean - k * sd
    return up, mid, low


@njit(cache=True)
def rsi(x: np.ndarray, n: int) -> np.ndarray:
    size = x.shape[0]
    out = np.full(size, np.nan)
    if size <= n:
        return out
    gain = 0.0
    loss = 0.0
    for i in range(1, n + 1):
        d = x[i] - x[i - 1]
        if d < 0:
            loss -= d
        else:
            gain += d
    gain /= n
    loss /= n
    total = gain + loss
    if total > _ZERO:
        out[n] = 100.0 * gain / total
    for i in range(n + 1, size):
        d = x[i] - x[i - 1]
        gain *= n - 1
        loss *= n - 1
        if d < 0:
            loss -= d
        else:
            gain += d
        gain /= n
        loss /= n
        total = gain + loss
        if total > _ZERO:
            out[i] = 100.0 * gain / total
    return out


@njit(cache=True)
def true_range(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> np.ndarray:
    size = high.shape[0]
    tr = np.full(size, np.nan)
    for i in range(1, size):
        pc = close[i - 1]
        tr[i] = max(high[i] - low[i], abs(high[i] - pc), abs(low[i] - pc))
    return tr


@njit(cache=True)
def atr(high: np.ndarray, low: np.ndarray, close: np.ndarray, n: int) -> np.ndarray:
    size = high.shape[0]
    out = np.full(size, np.nan)
    if size <= n:
        return out
    tr = true_range(high, low, close)
    acc = 0.0
    for i in range(1, n + 1):
        acc += tr[i]
    prev = acc / n
    out[n] = prev
    for i in range(n + 1, size):
        prev = (prev * (n - 1) + tr[i]) / n
        out[i] = prev
    return out


@njit(cache=True)
def adx(high: np.ndarray, low: np.ndarray, close: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(+DI, -DI, ADX) with TA-Lib's seeding (see the module docstring)."""
    size = high.shape[0]
    pdi = np.full(size, np.nan)
    mdi = np.full(size, np.nan)
    adx_out = np.full(size, np.nan)
    if size <= n:
        return pdi, mdi, adx_out
    p_dm = 0.0
    m_dm = 0.0
    tr_sum = 0.0
    adx_prev = 0.0
    dx_sum = 0.0
    for i in range(1, size):
        up = high[i] - high[i - 1]
        down = low[i - 1] - low[i]
        plus = 0.0
        minus = 0.0
        if down > 0 and up < down:
            minus = down
        elif up > 0 and up > down:
            plus = up
        pc = close[i - 1]
        tr = max(high[i] - low[i], abs(high[i] - pc), abs(low[i] - pc))
        if i < n:
            # The first n-1 bars seed the Wilder sums.
            p_dm += plus
            m_dm += minus
            tr_sum += tr
            continue
        p_dm = p_dm - p_dm / n + plus
        m_dm = m_dm - m_dm / n + minus
        tr_sum = tr_sum - tr_sum / n + tr
        dx = np.nan
        if tr_sum > _ZERO:
            pdi[i] = 100.0 * p_dm / tr_sum
            mdi[i] = 100.0 * m_dm / tr_sum
            s = pdi[i] + mdi[i]
            if s > _ZERO:
                dx = 100.0 * abs(pdi[i] - mdi[i]) / s
        else:
            # No range at all in the Wilder memory: direction is undefined.
            pdi[i] = np.nan
            mdi[i] = np.nan
        if i < 2 * n:
            if dx == dx:
                dx_sum += dx
            if i == 2 * n - 1:
                adx_prev = dx_sum / n
                adx_out[i] = adx_prev
        else:
            if dx == dx:
                adx_prev = (adx_prev * (n - 1) + dx) / n
            adx_out[i] = adx_prev
    return pdi, mdi, adx_out


@njit(cache=True)
def stoch_of(x: np.ndarray, n: int) -> np.ndarray:
    """Raw stochastic of a series against its own n-bar range, 0..100; NaN when flat."""
    size = x.shape[0]
    out = np.full(size, np.nan)
    for i in range(n - 1, size):
        hi = -np.inf
        lo = np.inf
        ok = True
        for j in range(i - n + 1, i + 1):
            v = x[j]
            if v != v:
                ok = False
                break
            if v > hi:
                hi = v
            if v < lo:
                lo = v
        if ok and hi - lo > 0:
            out[i] = 100.0 * (x[i] - lo) / (hi - lo)
    return out


@njit(cache=True)
def obv(close: np.ndarray, volume: np.ndarray) -> np.ndarray:
    size = close.shape[0]
    out = np.full(size, np.nan)
    if size == 0:
        return out
    acc = volume[0]  # TA-Lib starts OBV at the first bar's volume
    out[0] = acc
    for i in range(1, size):
        if close[i] > close[i - 1]:
            acc += volume[i]
        elif close[i] < close[i - 1]:
            acc -= volume[i]
        out[i] = acc
    return out


@njit(cache=True)
def midprice(high: np.ndarray, low: np.ndarray, n: int) -> np.ndarray:
    """(highest high + lowest low) / 2 over n bars: the Ichimoku lines."""
    size = high.shape[0]
    out = np.full(size, np.nan)
    for i in range(n - 1, size):
        hi = -np.inf
        lo = np.inf
        for j in range(i - n + 1, i + 1):
            if high[j] > hi:
                hi = high[j]
            if low[j] < lo:
                lo = low[j]
        out[i] = (hi + lo) / 2.0
    return out


@njit(cache=True)
def anchored_vwap(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
                  session: np.ndarray) -> np.ndarray:
    """VWAP of the typical price (h+l+c)/3, restarting whenever `session` changes."""
    size = high.shape[0]
    out = np.full(size, np.nan)
    pv = 0.0
    vol = 0.0
    for i in range(size):
        if i == 0 or session[i] != session[i - 1]:
            pv = 0.0
            vol = 0.0
        pv += (high[i] + low[i] + close[i]) / 3.0 * volume[i]
        vol += volume[i]
        if vol > 0:
            out[i] = pv / vol
    return out


@njit(cache=True)
def previous_period_pivots(high: np.ndarray, low: np.ndarray, close: np.ndarray,
                           period: np.ndarray) -> np.ndarray:
    """Classic floor pivots from the previous period's high/low/close.

    Returns columns P, R1, R2, S1, S2. The previous period is the latest earlier
    period present in the data; rows of the first period get NaN.
    """
    size = high.shape[0]
    out = np.full((size, 5), np.nan)
    have_prev = False
    ph = 0.0
    pl = 0.0
    pc = 0.0
    ch = -np.inf
    cl = np.inf
    cc = 0.0
    for i in range(size):
        if i > 0 and period[i] != period[i - 1]:
            ph = ch
            pl = cl
            pc = cc
            have_prev = True
            ch = -np.inf
            cl = np.inf
        if high[i] > ch:
            ch = high[i]
        if low[i] < cl:
            cl = low[i]
        cc = close[i]
        if have_prev:
            p = (ph + pl + pc) / 3.0
            out[i, 0] = p
            out[i, 1] = 2.0 * p - pl
            out[i, 2] = p + (ph - pl)
            out[i, 3] = 2.0 * p - ph
            out[i, 4] = p - (ph - pl)
    return out


@njit(cache=True)
def recent_fractals(high: np.ndarray, low: np.ndarray, count: int, lookback: int) -> tuple[np.ndarray, np.ndarray]:
    """The `count` most recent confirmed 5-bar (Bill Williams) fractal highs and lows.

    A fractal centred on bar j is only known once bars j+1 and j+2 have closed,
    so at row i the candidates are j <= i-2 (no lookahead), within `lookback` bars.
    Column 0 is the most recent. NaN where fewer were found.
    """
    size = high.shape[0]
    highs = np.full((size, count), np.nan)
    lows = np.full((size, count), np.nan)
    for i in range(4, size):
        nh = 0
        nl = 0
        stop = max(2, i - lookback)
        j = i - 2
        while j >= stop and (nh < count or nl < count):
            h = high[j]
            if nh < count and h > high[j - 1] and h > high[j - 2] and h > high[j + 1] and h > high[j + 2]:
                highs[i, nh] = h
                nh += 1
            lo = low[j]
            if nl < count and lo < low[j - 1] and lo < low[j - 2] and lo < low[j + 1] and lo < low[j + 2]:
                lows[i, nl] = lo
                nl += 1
            j -= 1
    return highs, lows


@njit(cache=True)
def volume_profile(high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray,
                   window: int, bins: int, value_area: float, first_row: int) -> np.ndarray:
    """Rolling volume profile over the last `window` bars: columns POC, VAH, VAL.

    Each bar's volume goes to the price bin of its typical price (h+l+c)/3;
    bins split [lowest low, highest high] of the window evenly. POC = centre of
    the fullest bin; the value area grows from the POC one bin at a time towards
    the fuller neighbour until it holds `value_area` of the volume; VAH/VAL are
    its outer bin edges. Rows before `first_row` are left NaN (the caller may
    only need the tail). NaN when the window traded no volume.
    """
    size = high.shape[0]
    out = np.full((size, 3), np.nan)
    hist = np.zeros(bins)
    for i in range(max(first_row, 0), size):
        start = max(0, i - window + 1)
        lo = np.inf
        hi = -np.inf
        total = 0.0
        for j in range(start, i + 1):
            if low[j] < lo:
                lo = low[j]
            if high[j] > hi:
                hi = high[j]
            total += volume[j]
        if not total > 0:
            continue
        if hi - lo <= 0:
            out[i, 0] = hi
            out[i, 1] = hi
            out[i, 2] = hi
            continue
        width = (hi - lo) / bins
        hist[:] = 0.0
        for j in range(start, i + 1):
            tp = (high[j] + low[j] + close[j]) / 3.0
            b = int((tp - lo) / width)
            if b >= bins:
                b = bins - 1
            elif b < 0:
                b = 0
            hist[b] += volume[j]
        poc = 0
        for b in range(1, bins):
            if hist[b] > hist[poc]:
                poc = b
        top = poc
        bottom = poc
        inside = hist[poc]
        target = value_area * total
        while inside < target and (top < bins - 1 or bottom > 0):
            above = hist[top + 1] if top < bins - 1 else -1.0
            below = hist[bottom - 1] if bottom > 0 else -1.0
            if above >= below:
                top += 1
                inside += above
            else:
                bottom -= 1
                inside += below
        out[i, 0] = lo + (poc + 0.5) * width
        out[i, 1] = lo + (top + 1) * width
        out[i, 2] = lo + bottom * width
    return out


@njit(cache=True)
def trailing_ema_obv(close: np.ndarray, volume: np.ndarray, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every bar i: EMA(n) and OBV computed over the trailing window close[i-window+1 : i+1] alone.

    The replay's window-dependent columns for every cycle at once. It calls the
    very kernels a live snapshot calls on its trailing window, so each value is
    bit-identical to that computation (same operations in the same order).
    """
    size = close.shape[0]
    ema_out = np.full(size, np.nan)
    obv_out = np.full(size, np.nan)
    for i in range(size):
        start = max(0, i - window + 1)
        ema_out[i] = ema(close[start:i + 1], n)[-1]
        obv_out[i] = obv(close[start:i + 1], volume[start:i + 1])[-1]
    return ema_out, obv_out
