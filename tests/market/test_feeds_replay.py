"""ReplayFeed: real OKX candles on a virtual clock; it never shows a bar that has not closed."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.feeds.base import FeedPermanentError
from market.feeds.replay import DAY_MS, ReplayFeed, Series, _dec, read_candle_csv

BTC = "BTC-USDT-SWAP"
TF_MS = {"5m": 300_000, "15m": 900_000, "1H": 3_600_000, "4H": 14_400_000}


@pytest.fixture(scope="module")
def btc_5m_2022() -> dict[str, np.ndarray]:
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "okx_BTC-USDT-SWAP_5m_2022.csv.gz"
    if not path.is_file():
        pytest.skip(f"real market data not found at {path}")
    return read_candle_csv(path)


@pytest.fixture(scope="module")
def replay_5m(btc_5m_2022: dict[str, np.ndarray]) -> ReplayFeed:
    feed = ReplayFeed()
    feed.add_series(BTC, "5m", **btc_5m_2022)
    return feed


def direct_resample(arrays: dict[str, np.ndarray], rule: str, per_bucket: int, clock_ms: int) -> pd.DataFrame:
    """pandas' own resample of the 5m bars closed by the clock; complete buckets only."""
    frame = pd.DataFrame({k: arrays[k] for k in ("open", "high", "low", "close", "volume")},
                         index=pd.to_datetime(arrays["ts"], unit="ms", utc=True))
    frame = frame[arrays["ts"] + 300_000 <= clock_ms]
    grouped = frame.resample(rule, label="left", closed="left")
    out = grouped.agg({"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"})
    out["n"] = grouped["close"].count()
    return out[out["n"] == per_bucket].drop(columns="n")


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(min_value=0, max_value=70_499 * 300_000), jitter=st.integers(min_value=0, max_value=299_999),
       tf=st.sampled_from(["5m", "15m", "1H", "4H"]), limit=st.integers(min_value=1, max_value=400))
def test_it_never_returns_a_bar_that_closes_after_the_clock(replay_5m: ReplayFeed, btc_5m_2022, offset: int,
                                                            jitter: int, tf: str, limit: int) -> None:
    clock_ms = int(btc_5m_2022["ts"][0]) + offset + jitter
    replay_5m.set_clock(datetime.fromtimestamp(clock_ms / 1000, tz=UTC))
    bars = replay_5m.candles(BTC, tf, limit=limit)
    closes = [int(b.ts.timestamp() * 1000) + TF_MS[tf] for b in bars]
    assert all(c <= clock_ms for c in closes)
    assert len(bars) <= limit
    # Nothing that had closed by the clock is missing from the end: the newest closed bar is there.
    if bars:
        assert closes[-1] > clock_ms - 2 * TF_MS[tf]
    ticker = replay_5m.ticker(BTC) if clock_ms >= int(btc_5m_2022["ts"][0]) + 300_000 else None
    if ticker is not None:
        assert ticker.ts <= replay_5m.now()
        assert ticker.last == (bars[-1].close if tf == "5m" and bars else ticker.last)


@settings(max_examples=25, deadline=None)
@given(offset=st.integers(min_value=86_400_000, max_value=70_000 * 300_000),
       tf=st.sampled_from([("15m", "15min", 3), ("1H", "1h", 12), ("4H", "4h", 48)]))
def test_resampled_bars_equal_a_direct_resample_of_the_closed_data(replay_5m: ReplayFeed, btc_5m_2022, offset: int,
                                                                   tf: tuple[str, str, int]) -> None:
    name, rule, per_bucket = tf
    clock_ms = int(btc_5m_2022["ts"][0]) + offset
    replay_5m.set_clock(datetime.fromtimestamp(clock_ms / 1000, tz=UTC))
    got = replay_5m.frame(BTC, name, limit=50)
    window = {k: v[(btc_5m_2022["ts"] >= clock_ms - 60 * TF_MS[name]) & (btc_5m_2022["ts"] < clock_ms)]
              for k, v in btc_5m_2022.items()}
    expected = direct_resample(window, rule, per_bucket, clock_ms).tail(len(got))
    assert list(got.index) == list(expected.index)
    np.testing.assert_array_equal(got[["open", "high", "low", "close"]].to_numpy(),
                                  expected[["open", "high", "low", "close"]].to_numpy())
    np.testing.assert_allclose(got["volume"].to_numpy(), expected["volume"].to_numpy(), rtol=1e-12)


def test_resampled_4h_matches_the_native_4h_file(shared_data: Path) -> None:
    feed = ReplayFeed.from_csv(shared_data / "okx_BTC-USDT-SWAP_15m.csv.gz", inst_id=BTC)
    native = ReplayFeed.from_csv(shared_data / "okx_BTC-USDT-SWAP_4H.csv", inst_id=BTC)
    feed.set_clock(datetime(2024, 6, 1, tzinfo=UTC))
    native.set_clock(datetime(2024, 6, 1, tzinfo=UTC))
    ours, theirs = feed.candles(BTC, "4H", limit=500), native.candles(BTC, "4H", limit=500)
    assert [b.ts for b in ours] == [b.ts for b in theirs]
    assert [(b.open, b.high, b.low, b.close) for b in ours] == [(b.open, b.high, b.low, b.close) for b in theirs]


def test_a_bucket_still_forming_is_never_returned(replay_5m: ReplayFeed) -> None:
    replay_5m.set_clock(datetime(2022, 6, 1, 10, 55, tzinfo=UTC))
    assert replay_5m.candles(BTC, "1H", limit=1)[0].ts == datetime(2022, 6, 1, 9, tzinfo=UTC)
    assert replay_5m.candles(BTC, "4H", limit=1)[0].ts == datetime(2022, 6, 1, 4, tzinfo=UTC)
    replay_5m.set_clock(datetime(2022, 6, 1, 11, 0, tzinfo=UTC))
    assert replay_5m.candles(BTC, "1H", limit=1)[0].ts == datetime(2022, 6, 1, 10, tzinfo=UTC)
    assert replay_5m.candles(BTC, "5m", limit=1)[0].ts == datetime(2022, 6, 1, 10, 55, tzinfo=UTC)


def test_before_limits_bars_by_open_time(replay_5m: ReplayFeed) -> None:
    replay_5m.set_clock(datetime(2022, 6, 2, tzinfo=UTC))
    bars = replay_5m.candles(BTC, "1H", limit=3, before=datetime(2022, 6, 1, 12, tzinfo=UTC))
    assert [b.ts.hour for b in bars] == [9, 10, 11]


def test_the_ticker_is_the_last_closed_price_and_quotes_are_unknown(shared_data: Path) -> None:
    feed = ReplayFeed.from_csv(shared_data / "okx_BTC-USDT-SWAP_1H.csv", inst_id=BTC,
                               funding_csv=shared_data / "okx_BTC-USDT-SWAP_funding_rate.csv",
                               clock=datetime(2025, 11, 1, 8, 30, tzinfo=UTC))
    last = feed.candles(BTC, "1H", limit=1)[0]
    ticker = feed.ticker(BTC)
    assert ticker.last == last.close and ticker.ts == datetime(2025, 11, 1, 8, tzinfo=UTC)
    assert ticker.bid is None and ticker.ask is None
    book = feed.order_book(BTC)
    assert book.bids == () and book.asks == ()
    funding = feed.funding_rate(BTC)
    assert funding.ts == datetime(2025, 11, 1, 8, tzinfo=UTC)  # the settlement at or before the clock
    assert funding.next_funding_time == datetime(2025, 11, 1, 16, tzinfo=UTC)
    assert funding.rate is not None and abs(funding.rate) < Decimal("0.001")
    assert feed.open_interest(BTC).oi_contracts is None


def test_it_cannot_build_a_finer_timeframe_than_it_has(shared_data: Path) -> None:
    feed = ReplayFeed.from_csv(shared_data / "okx_BTC-USDT-SWAP_1H.csv", inst_id=BTC)
    with pytest.raises(FeedPermanentError, match="15m"):
        feed.candles(BTC, "15m")


def test_a_csv_with_the_wrong_header_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,o,h,l,c,v\n1,2,3,4,5,6\n")
    with pytest.raises(FeedPermanentError, match="header"):
        ReplayFeed.from_csv(bad, inst_id=BTC)


@pytest.mark.parametrize(("cell", "says"), [("abc", "line 3: high 'abc' is not a number"), ("", "empty price cells")])
def test_a_price_cell_that_is_not_a_number_names_its_line_and_column(tmp_path: Path, cell: str, says: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(f"ts,open,high,low,close,volume\n1700000000000,1,2,0.5,1.5,10\n1700000300000,1,{cell},0.5,1.5,10\n")
    with pytest.raises(FeedPermanentError, match=says):
        ReplayFeed.from_csv(bad, inst_id=BTC)


def test_a_csv_with_a_stray_volume_word_is_refused_but_an_empty_volume_is_zero(tmp_path: Path) -> None:
    rows = "ts,open,high,low,close,volume\n1700000000000,1,2,0.5,1.5,{}\n1700000300000,1,2,0.5,1.5,10\n"
    (tmp_path / "a.csv").write_text(rows.format("n/a?"))
    with pytest.raises(FeedPermanentError, match="line 2: volume 'n/a\\?' is not a number"):
        read_candle_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text(rows.format(""))
    assert list(read_candle_csv(tmp_path / "b.csv")["volume"]) == [0.0, 10.0]


def test_the_default_clock_of_a_file_replay_is_its_last_close(shared_data: Path) -> None:
    feed = ReplayFeed.from_csv(shared_data / "okx_BTC-USDT-SWAP_4H.csv", inst_id=BTC)
    assert feed.now() == datetime(2026, 4, 18, 4, tzinfo=UTC)
    assert feed.candles(BTC, "4H", limit=1)[0].ts == feed.now() - timedelta(hours=4)


def test_a_bucket_with_a_missing_base_bar_is_not_a_bar() -> None:
    ts = np.arange(0, 24, dtype=np.int64) * 300_000  # two hours of 5m bars from 1970-01-01 00:00
    keep = ts != 7 * 300_000  # a hole in the first hour
    feed = ReplayFeed(clock=datetime(1970, 1, 1, 3, tzinfo=UTC))
    price = np.linspace(100, 123, 24)
    feed.add_series(BTC, "5m", ts=ts[keep], open=price[keep], high=price[keep] + 1, low=price[keep] - 1,
                    close=price[keep], volume=np.ones(24)[keep])
    hours = feed.candles(BTC, "1H", limit=10)
    assert [b.ts.hour for b in hours] == [1]
    assert hours[0].open == Decimal("112.0") and hours[0].high == Decimal("124.0") and hours[0].volume == Decimal("12.0")


def _series_5m(high: np.ndarray, low: np.ndarray) -> Series:
    ts = np.arange(len(high), dtype=np.int64) * 300_000
    mid = (high + low) / 2
    return Series(300_000, ts, mid, high, low, mid, np.ones(len(high)))


def _slices_answer(s: Series, start: int, end: int) -> tuple[str, str]:
    # Text, not Decimal equality: NaN equals nothing, and "0.0" and "-0.0" are equal Decimals.
    return str(_dec(s.high[start:end].max())), str(_dec(s.low[start:end].min()))


def _windows_of_every_move(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, end) windows over n bars, in the order the ticker could ask for them: forward a bar
    at a time, forward by up to 12 and by more, backwards, shrinking and growing, then at random."""
    windows: list[tuple[int, int]] = []
    width = 30  # narrower than a day, so extremes leave the window often

    def add(new_start: int, new_end: int) -> None:
        new_start = min(max(new_start, 0), n - 1)
        windows.append((new_start, min(max(new_end, new_start + 1), n)))

    for start in range(0, n // 3):  # sliding bar by bar: the replay's every cycle
        add(start, start + width)
    for _ in range(40):  # forward by 2..12 bars (still the incremental window), start moving its own way
        start, end = windows[-1]
        add(start + int(rng.integers(0, 13)), end + int(rng.integers(2, 13)))
    for _ in range(40):  # forward by more than 12 bars
        start, end = windows[-1]
        step = int(rng.integers(13, 60))
        add(start + step, end + step)
        if end + step >= n:
            add(n // 2, n // 2 + width)
    for _ in range(40):  # backwards, a bar or many
        start, end = windows[-1]
        step = int(rng.integers(1, 40))
        add(start - step, end - step)
    for _ in range(80):  # shrinking and growing from either side (a gap entering or leaving the day)
        start, end = windows[-1]
        add(start + int(rng.integers(-8, 9)), end + int(rng.integers(-8, 9)))
    for _ in range(200):  # anywhere at all
        a, b = sorted(int(x) for x in rng.integers(0, n + 1, size=2))
        add(a, b)
    return windows


def _highs_lows(kind: str, rng: np.random.Generator, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    close = 20_000 + np.cumsum(rng.normal(0, 15, n))
    high = close + np.abs(rng.normal(0, 10, n))
    low = close - np.abs(rng.normal(0, 10, n))
    if kind == "coarse tick":  # moves of a few ticks: many equal highs and equal lows, new ones a tick beyond
        close = 20_000 + np.cumsum(rng.normal(0, 1.5, n))
        high = np.ceil(close + np.abs(rng.normal(0, 1, n)))
        low = np.floor(close - np.abs(rng.normal(0, 1, n)))
    elif kind == "flat runs":  # the same high (low) bar after bar, then a new one equal to an old one
        high, low = np.repeat(np.round(high[::25], 1), 25)[:n], np.repeat(np.round(low[::25], 1), 25)[:n]
    elif kind == "spikes":  # lone extremes that the window slides past
        for i in rng.choice(n, size=30, replace=False):
            high[i] += 3_000
        for i in rng.choice(n, size=30, replace=False):
            low[i] -= 3_000
    return high, low


@pytest.mark.parametrize("kind", ["random walk", "coarse tick", "flat runs", "spikes"])
def test_day_range_equals_the_slices_max_and_min_for_windows_moving_every_way(kind: str) -> None:
    rng = np.random.default_rng(20260521)
    high, low = _highs_lows(kind, rng)
    s = _series_5m(high, low)
    assert s._positive_hl  # these prices take the remembering path
    for start, end in _windows_of_every_move(len(s), rng):
        got = s.day_range(start, end)
        assert (str(got[0]), str(got[1])) == _slices_answer(s, start, end), (kind, start, end)


@pytest.mark.parametrize("bad", ["nan high", "nan low", "zero low", "negative zero low"])
def test_day_range_with_a_nan_or_zero_price_is_still_the_slices_own_answer(bad: str) -> None:
    rng = np.random.default_rng(7)
    high, low = _highs_lows("coarse tick", rng, n=600)
    where = [100, 101, 350]
    if bad == "nan high":
        high[where] = np.nan
    elif bad == "nan low":
        low[where] = np.nan
    else:
        low[where] = 0.0 if bad == "zero low" else -0.0
        low[where[0] + 3] = 0.0  # both signs of zero in one window
    s = _series_5m(high, low)
    assert not s._positive_hl  # the fallback path
    for start, end in _windows_of_every_move(len(s), rng):
        got = s.day_range(start, end)
        assert (str(got[0]), str(got[1])) == _slices_answer(s, start, end), (bad, start, end)


def test_the_ticker_24h_high_and_low_are_those_of_the_last_24h_bars_at_every_clock() -> None:
    rng = np.random.default_rng(11)
    n = 6 * 288  # six days of 5m bars
    high, low = _highs_lows("coarse tick", rng, n=n)
    base_ms = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
    ts = base_ms + np.arange(n, dtype=np.int64) * 300_000
    keep = np.ones(n, dtype=bool)
    keep[400:460] = False  # a five-hour outage: the day shrinks as it enters, grows as it leaves
    keep[rng.choice(n, size=40, replace=False)] = False  # and single missing bars
    ts, high, low = ts[keep], high[keep], low[keep]
    mid = (high + low) / 2
    feed = ReplayFeed()
    feed.add_series(BTC, "5m", ts=ts, open=mid, high=high, low=low, close=mid, volume=np.ones(len(ts)))

    first = datetime(2024, 3, 1, 0, 5, tzinfo=UTC)
    clocks = [first + timedelta(minutes=5 * i) for i in range(1, 900)]  # the replay: a bar per cycle
    clocks += [clocks[-1] + timedelta(seconds=int(s)) for s in np.cumsum(rng.integers(1, 3 * 3600, 60))]  # jumps
    clocks += [first + timedelta(seconds=int(s)) for s in rng.integers(0, 6 * 86_400, 150)]  # anywhere, back too
    clocks += [datetime(2024, 3, 2, 15, tzinfo=UTC) + timedelta(minutes=5 * i) for i in range(100)]  # again forward
    for clock in clocks:
        feed.set_clock(clock)
        clock_ms = base_ms + int((clock - datetime(2024, 3, 1, tzinfo=UTC)).total_seconds()) * 1000
        closed = ts + 300_000 <= clock_ms
        last_close = int(ts[closed][-1]) + 300_000
        day = closed & (ts >= last_close - DAY_MS)
        ticker = feed.ticker(BTC)
        assert ticker.ts == datetime.fromtimestamp(last_close / 1000, tz=UTC)
        assert (ticker.high_24h, ticker.low_24h) == (_dec(high[day].max()), _dec(low[day].min())), clock
        assert (str(ticker.high_24h), str(ticker.low_24h)) == (str(_dec(high[day].max())), str(_dec(low[day].min())))
