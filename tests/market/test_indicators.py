"""Indicators against the TA-Lib references, and robustness on real edge cases."""
from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from market.indicators import COLUMNS, indicator_set_at, indicators_compute

REFS = "indicator_refs"
SLICE = "talib_okx_BTC-USDT-SWAP_1H_2024-07-20_2024-08-10.csv"
# our column -> the reference column (TA-Lib; StochRSI: the TradingView-style K/D we use)
REFERENCE_COLUMNS = {
    "rsi_14": "rsi14", "macd": "macd_12_26_9", "macd_signal_line": "macd_signal", "macd_hist": "macd_hist",
    "bb_upper": "bb20_upper", "bb_middle": "bb20_middle", "bb_lower": "bb20_lower", "ema_20": "ema20",
    "atr_14": "atr14", "adx_14": "adx14", "plus_di": "plus_di14", "minus_di": "minus_di14",
    "stochrsi_k": "stochrsi_k_14_14_3_tvstyle", "stochrsi_d": "stochrsi_d_3_tvstyle", "obv": "obv",
}


def frame_of(raw: pd.DataFrame) -> pd.DataFrame:
    df = raw[["open", "high", "low", "close", "volume"]].astype(float).copy()
    df.index = pd.DatetimeIndex(pd.to_datetime(raw["ts"].astype("int64"), unit="ms", utc=True), name="ts")
    return df


def assert_matches(ours: pd.Series, ref: pd.Series, *, start: int, name: str) -> None:
    a = ours.to_numpy(dtype=float)[start:]
    b = ref.to_numpy(dtype=float)[start:]
    both = ~np.isnan(b)
    assert not np.isnan(a[both]).any(), f"{name}: NaN where the reference has a value"
    # 1e-6 relative; the absolute floor only covers exact zeros (oscillators at 0, printed as "0").
    np.testing.assert_allclose(a[both], b[both], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.fixture
def slice_ref(shared_data: Path) -> pd.DataFrame:
    return pd.read_csv(shared_data / REFS / SLICE)


def test_it_matches_talib_on_the_self_contained_slice(shared_data: Path, slice_ref: pd.DataFrame) -> None:
    computed = indicators_compute(frame_of(slice_ref))
    for ours, theirs in REFERENCE_COLUMNS.items():
        # Values are compared from the first bar TA-Lib prints: the slice starts at its own row 0.
        assert_matches(computed[ours], slice_ref[theirs], start=0, name=ours)


def test_it_matches_talib_on_a_window_of_the_full_history_after_warm_up(shared_data: Path) -> None:
    raw = pd.read_csv(shared_data / "okx_BTC-USDT-SWAP_1H.csv")
    with gzip.open(shared_data / REFS / "talib_okx_BTC-USDT-SWAP_1H.csv.gz", "rt") as fh:
        ref = pd.read_csv(fh)
    assert (raw["ts"].to_numpy() == ref["ts"].to_numpy()).all()
    lo, hi, warm_up = 20_000, 21_000, 400  # seeds differ; Wilder/EMA memories converge within 400 bars
    window = raw.iloc[lo:hi].reset_index(drop=True)
    window_ref = ref.iloc[lo:hi].reset_index(drop=True)
    computed = indicators_compute(frame_of(window))
    for ours, theirs in REFERENCE_COLUMNS.items():
        if ours == "obv":
            continue  # a running sum: only its changes are start-independent (checked next)
        assert_matches(computed[ours], window_ref[theirs], start=warm_up, name=ours)
    assert_matches(computed["obv"].diff(), window_ref["obv"].diff(), start=1, name="obv changes")


def test_stochrsi_is_the_smoothed_tradingview_convention_not_talib_fastk(slice_ref: pd.DataFrame) -> None:
    computed = indicators_compute(frame_of(slice_ref))
    fastk = slice_ref["stochrsi_fastk_14_14"].to_numpy()
    k = computed["stochrsi_k"].to_numpy()
    both = ~np.isnan(fastk) & ~np.isnan(k)
    assert np.nanmax(np.abs(k[both] - fastk[both])) > 1.0  # the unsmoothed TA-Lib fastk is a different series


def test_bollinger_rsi_atr_match_the_stockcharts_sheets_where_the_convention_matches(shared_data: Path) -> None:
    bb = pd.read_csv(shared_data / REFS / "stockcharts-via-ta_cs-bbands.csv")
    n = len(bb)
    flat = pd.DataFrame({"open": bb["Close"], "high": bb["Close"], "low": bb["Close"], "close": bb["Close"],
                         "volume": 1.0}).astype(float)
    flat.index = pd.date_range("2024-01-01", periods=n, freq="1h", tz="UTC")
    computed = indicators_compute(flat)
    expected = bb.columns[bb.columns.str.contains("HighBand", case=False)]
    assert len(expected) == 1
    got = computed["bb_upper"].to_numpy()
    ref = bb[expected[0]].to_numpy(dtype=float)
    both = ~np.isnan(ref) & ~np.isnan(got)
    np.testing.assert_allclose(got[both], ref[both], rtol=1e-6)
    # RSI of the ChartSchool closes: the widely cited StockCharts values (TA-Lib's convention).
    rsi_sheet = pd.read_csv(shared_data / REFS / "stockcharts-via-ta_cs-rsi.csv")
    closes = rsi_sheet["Close"].astype(float)
    frame = pd.DataFrame({"open": closes, "high": closes, "low": closes, "close": closes, "volume": 1.0})
    frame.index = pd.date_range("2024-01-01", periods=len(frame), freq="1h", tz="UTC")
    rsi = indicators_compute(frame)["rsi_14"].dropna().to_numpy()[:5]
    np.testing.assert_allclose(rsi, [70.53, 66.32, 66.55, 69.41, 66.36], atol=0.006)


def test_ichimoku_and_vwap_equal_pandas_ta_and_no_chikou(slice_ref: pd.DataFrame) -> None:
    import pandas_ta as ta

    df = frame_of(slice_ref)
    study = ta.Study(name="check", ta=[
        {"kind": "ichimoku", "tenkan": 9, "kijun": 26, "senkou": 52, "include_chikou": False},
        {"kind": "vwap", "anchor": "D"},
    ])
    theirs = df.copy()
    theirs.ta.study(study, cores=0)
    assert not any(c.startswith("ICS") for c in theirs.columns)
    ours = indicators_compute(df)
    assert not any("chikou" in c for c in ours.columns)
    for mine, col in [("ichimoku_tenkan", "ITS_9"), ("ichimoku_kijun", "IKS_26"),
                      ("ichimoku_senkou_a", "ISA_9"), ("ichimoku_senkou_b", "ISB_26"), ("vwap", "VWAP_D")]:
        np.testing.assert_allclose(ours[mine].to_numpy(), theirs[col].to_numpy(), rtol=1e-9, err_msg=mine)


def synthetic_candles(n: int, *, seed: int = 1, freq: str = "1h") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 30_000 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.concatenate([close[:1], close[:-1]])
    spread = np.abs(rng.normal(0, 0.004, n)) * close
    df = pd.DataFrame({"open": open_, "high": np.maximum(open_, close) + spread,
                       "low": np.minimum(open_, close) - spread, "close": close,
                       "volume": rng.uniform(10, 1000, n)})
    df.index = pd.date_range("2024-01-01", periods=n, freq=freq, tz="UTC", name="ts")
    return df


def test_changing_future_bars_never_changes_past_values() -> None:
    df = synthetic_candles(600)
    base = indicators_compute(df)
    cut = 450
    changed = df.copy()
    rng = np.random.default_rng(9)
    changed.iloc[cut + 1:, :4] *= rng.uniform(0.8, 1.2, size=(len(df) - cut - 1, 1))
    changed.iloc[cut + 1:, 4] *= 7.0
    after = indicators_compute(changed)
    pd.testing.assert_frame_equal(base.iloc[: cut + 1], after.iloc[: cut + 1])


@pytest.mark.parametrize("n", [0, 1, 2, 5, 30, 60])
def test_short_histories_give_none_not_errors(n: int) -> None:
    computed = indicators_compute(synthetic_candles(n))
    assert list(computed.columns[5:]) == list(COLUMNS)
    assert len(computed) == n
    ind = indicator_set_at(computed)
    if n < 200:
        assert ind.ema_200 is None
    if n < 28:
        assert ind.adx_14 is None
    dumped = ind.model_dump()
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in dumped.values())


def test_indicator_set_at_an_out_of_range_row_is_empty() -> None:
    assert indicator_set_at(indicators_compute(synthetic_candles(3)), i=10).rsi_14 is None


def test_the_2022_12_18_outage_run_of_flat_zero_volume_bars_does_not_break_anything(shared_data: Path) -> None:
    raw = pd.read_csv(shared_data / "okx_BTC-USDT-SWAP_5m_2022.csv.gz")
    df = frame_of(raw)
    day = df.loc["2022-12-15":"2022-12-19"]
    flat = (day["volume"] == 0) & (day["high"] == day["low"])
    assert flat.sum() >= 100  # the real outage run is in there
    computed = indicators_compute(day)
    last_flat = flat[flat].index[-1]
    inside = computed.loc[last_flat]
    assert inside["atr_14"] >= 0
    assert math.isnan(inside["volume_vs_avg"])  # a 20-bar mean of zero volume: undefined, not inf
    # Flat bars shrink average gain and loss alike: RSI holds its value through the outage.
    run = computed.loc[flat[flat].index[20]:last_flat, "rsi_14"]
    assert run.notna().all() and run.max() - run.min() < 1e-9
    ind = indicator_set_at(computed, i=int(computed.index.get_loc(last_flat)))
    assert ind.volume_vs_avg is None and ind.close is not None and ind.rsi_14 is not None
    assert not np.isinf(computed.to_numpy()).any()
    # and the indicators recover once trading resumes
    assert indicator_set_at(computed).rsi_14 is not None


def test_gaps_in_the_candles_are_tolerated() -> None:
    df = synthetic_candles(400)
    gappy = df.drop(df.index[100:130]).drop(df.index[250:252])
    computed = indicators_compute(gappy)
    ind = indicator_set_at(computed)
    assert ind.rsi_14 is not None and ind.vwap is not None and ind.pivot is not None


def test_unsorted_duplicated_input_is_sorted_and_deduplicated() -> None:
    df = synthetic_candles(100)
    messy = pd.concat([df.iloc[50:], df.iloc[:50], df.iloc[[10]]])
    pd.testing.assert_frame_equal(indicators_compute(messy), indicators_compute(df), check_freq=False)


def test_a_market_that_never_moved_has_no_rsi_stochrsi_or_di_rather_than_fake_extremes() -> None:
    df = synthetic_candles(300)
    df[["open", "high", "low", "close"]] = 100.0
    df["volume"] = 0.0
    ind = indicator_set_at(indicators_compute(df))
    assert ind.rsi_14 is None and ind.stochrsi_k is None and ind.plus_di is None
    assert ind.adx_14 == 0.0  # like TA-Lib: no directional movement at all is zero trend strength
    assert ind.atr_14 == 0.0 and ind.atr_ratio is None and ind.bb_position is None and ind.vwap is None
    assert ind.ema_200 == 100.0 and ind.ema_alignment == "mixed"


def test_support_is_below_and_resistance_above_the_close() -> None:
    ind = indicator_set_at(indicators_compute(synthetic_candles(500)))
    assert ind.support and ind.resistance
    assert all(level < ind.close for level in ind.support)
    assert all(level > ind.close for level in ind.resistance)
    assert list(ind.support) == sorted(ind.support, reverse=True)
    assert ind.vp_val <= ind.vp_poc <= ind.vp_vah


def test_weekly_pivots_from_4h_come_from_the_previous_week() -> None:
    df = synthetic_candles(200, freq="4h")  # 2024-01-01 is a Monday
    computed = indicators_compute(df)
    week1 = df.loc["2024-01-01":"2024-01-07"]
    p = (week1["high"].max() + week1["low"].min() + week1["close"].iloc[-1]) / 3
    assert computed.loc["2024-01-08 00:00", "pivot"] == pytest.approx(p, rel=1e-12)
    assert computed.loc["2024-01-14 20:00", "pivot"] == pytest.approx(p, rel=1e-12)
    assert math.isnan(computed.loc["2024-01-07 20:00", "pivot"])


def test_derived_signals() -> None:
    computed = indicators_compute(synthetic_candles(400))
    hist = computed["macd_hist"]
    ups = computed.index[computed["macd_cross"] == 1]
    assert len(ups) > 0
    for ts in ups:
        i = computed.index.get_loc(ts)
        assert hist.iloc[i - 1] <= 0 < hist.iloc[i]
    row = computed.iloc[-1]
    assert row["bb_position"] == pytest.approx((row["close"] - row["bb_lower"]) / (row["bb_upper"] - row["bb_lower"]))
    assert row["ema20_slope"] == pytest.approx(row["ema_20"] / computed["ema_20"].iloc[-6] - 1)
    assert row["atr_ratio"] == pytest.approx(row["atr_14"] / computed["atr_14"].iloc[-50:].mean())
    assert row["volume_vs_avg"] == pytest.approx(row["volume"] / computed["volume"].iloc[-20:].mean())


def test_the_indicators_command_writes_every_column_for_every_candle(tmp_path: Path, slice_ref: pd.DataFrame) -> None:
    from django.core.management import call_command

    src = tmp_path / "candles.csv"
    slice_ref[["ts", "open", "high", "low", "close", "volume"]].to_csv(src, index=False)
    out = tmp_path / "out.csv"
    call_command("indicators", "--csv", str(src), "--tf", "1H", "--out", str(out))
    written = pd.read_csv(out)
    assert list(written.columns) == ["ts", *COLUMNS]
    assert len(written) == len(slice_ref)
    assert (written["ts"] == slice_ref["ts"]).all()
    np.testing.assert_allclose(written["rsi_14"].to_numpy()[14:], slice_ref["rsi14"].to_numpy()[14:], rtol=1e-9)


def test_the_indicators_command_rejects_a_csv_without_the_columns(tmp_path: Path) -> None:
    from django.core.management import call_command
    from django.core.management.base import CommandError

    src = tmp_path / "bad.csv"
    src.write_text("ts,close\n1,2\n")
    with pytest.raises(CommandError, match="open"):
        call_command("indicators", "--csv", str(src), "--tf", "1H")
