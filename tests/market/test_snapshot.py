"""Snapshots: from frames (replay), from feeds (synthetic and a failing one), JSON, replay equivalence."""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from django.conf import settings as django_settings

from market.feeds.base import (
    BookLevel,
    FeedPermanentError,
    FeedTemporaryError,
    FundingRate,
    OpenInterest,
    OrderBook,
    Ticker,
)
from market.feeds.replay import ReplayFeed
from market.indicators import COLUMNS, WINDOW_DEPENDENT, indicators_compute
from market.schemas import MarketSnapshot
from market.snapshot import (
    SnapshotUnavailable,
    TimeframeSeries,
    closed_by,
    snapshot_build,
    snapshot_from_frames,
)

INST = "BTC-USDT-SWAP"


def read_frame(path: Path) -> pd.DataFrame:
    raw = pd.read_csv(path)
    df = raw[["open", "high", "low", "close", "volume"]].astype(float)
    df.index = pd.DatetimeIndex(pd.to_datetime(raw["ts"], unit="ms", utc=True), name="ts")
    return df


@functools.cache
def _load_frames(data: Path) -> dict[str, pd.DataFrame]:
    return {
        "15m": read_frame(data / "okx_BTC-USDT-SWAP_15m.csv.gz"),
        "1H": read_frame(data / "okx_BTC-USDT-SWAP_1H.csv"),
        "4H": read_frame(data / "okx_BTC-USDT-SWAP_4H.csv"),
    }


@pytest.fixture
def real_frames(shared_data: Path) -> dict[str, pd.DataFrame]:
    return _load_frames(shared_data)  # read once per session; tests only slice it


def no_nan_anywhere(obj: object) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(no_nan_anywhere(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(no_nan_anywhere(v) for v in obj)
    return not (isinstance(obj, str) and obj.lower() in {"nan", "inf", "-inf", "infinity"})


def test_snapshot_from_real_frames_fills_every_timeframe_and_round_trips_json(real_frames) -> None:
    as_of = datetime(2024, 8, 5, 12, 7, tzinfo=UTC)
    snap = snapshot_from_frames(
        inst_id=INST, as_of=as_of, source="replay", candles=real_frames,
        funding=FundingRate(inst_id=INST, ts=as_of, rate=Decimal("0.0001"), next_funding_time=as_of),
        open_interest=OpenInterest(inst_id=INST, ts=as_of, oi_contracts=Decimal("1200"), oi_ccy=None),
        open_interest_4h_ago=Decimal("1000"),
    )
    for tf, view in snap.timeframes.items():
        assert view.candles_used == 1000
        close_time = view.last_closed_ts + {"15m": timedelta(minutes=15), "1H": timedelta(hours=1),
                                            "4H": timedelta(hours=4)}[tf]
        assert close_time <= as_of < close_time + (close_time - view.last_closed_ts)
        assert view.indicators.ema_200 is not None and view.indicators.vp_poc is not None
        assert view.regime != "unknown"
        assert len(view.recent_candles) == 5
    assert snap.price == Decimal(repr(float(real_frames["15m"].loc["2024-08-05 11:45", "close"])))
    assert snap.regime == snap.timeframes["1H"].regime
    assert snap.oi_change_4h_pct == pytest.approx(0.2)
    assert snap.anomalies.oi_change_4h and any("open interest" in r for r in snap.anomalies.reasons)
    # 2024-08-05 was a crash day: the 1H move is real data
    h = real_frames["15m"]
    expected = float(snap.price) / float(h.loc["2024-08-05 10:45", "close"]) - 1
    assert snap.price_change_1h_pct == pytest.approx(expected)
    text = snap.to_json()
    assert MarketSnapshot.model_validate_json(text) == snap
    assert no_nan_anywhere(json.loads(text))


def test_replay_with_precomputed_indicators_equals_the_live_trailing_window(real_frames) -> None:
    candles = {tf: f.loc[:"2024-06-01"] for tf, f in real_frames.items()}
    computed = {tf: indicators_compute(f) for tf, f in candles.items()}
    for as_of in (datetime(2024, 3, 1, 0, 0, tzinfo=UTC), datetime(2024, 5, 17, 13, 20, tzinfo=UTC)):
        replay = snapshot_from_frames(inst_id=INST, as_of=as_of, source="replay", candles=candles, computed=computed)
        live = snapshot_from_frames(inst_id=INST, as_of=as_of, source="replay",
                                    candles={tf: closed_by(f, tf, as_of).iloc[-1000:] for tf, f in candles.items()})
        for tf in candles:
            a = replay.timeframes[tf].indicators.model_dump()
            b = live.timeframes[tf].indicators.model_dump()
            for name in COLUMNS:
                if name not in a:
                    continue
                x, y = a[name], b[name]
                if isinstance(x, float) and isinstance(y, float):
                    assert x == pytest.approx(y, rel=1e-9, abs=1e-12), (tf, name, as_of)
                else:
                    assert x == y, (tf, name, as_of)
            assert a["support"] == pytest.approx(b["support"], rel=1e-9)
        assert replay.regime == live.regime


def test_without_the_window_rule_ema200_and_obv_would_differ(real_frames) -> None:
    # Why WINDOW_DEPENDENT exists: the full-history row differs from the 1000-bar window for these.
    frame = real_frames["1H"].loc[:"2024-06-01"]
    full = indicators_compute(frame).iloc[-1]
    window = indicators_compute(frame.iloc[-1000:]).iloc[-1]
    assert abs(full["ema_200"] / window["ema_200"] - 1) > 1e-9
    assert full["obv"] != pytest.approx(window["obv"], rel=1e-6)
    assert set(WINDOW_DEPENDENT) == {"ema_200", "ema_alignment", "obv"}


@pytest.mark.parametrize("n", [0, 1, 5, 30])
def test_short_histories_make_a_snapshot_with_none_indicators(real_frames, n: int) -> None:
    frames = {tf: f.loc["2024-01-01":].iloc[:n] for tf, f in real_frames.items()}
    as_of = datetime(2024, 3, 1, tzinfo=UTC)
    ticker = Ticker(inst_id=INST, ts=as_of, last=Decimal("42000.5"), bid=None, ask=None, open_24h=None,
                    high_24h=None, low_24h=None, volume_24h=None)
    snap = snapshot_from_frames(inst_id=INST, as_of=as_of, source="replay", candles=frames, ticker=ticker)
    assert snap.price == Decimal("42000.5")
    for view in snap.timeframes.values():
        assert view.candles_used == n
        assert view.indicators.ema_200 is None
        assert view.indicators.rsi_14 is None or n >= 15
    assert no_nan_anywhere(json.loads(snap.to_json()))


def test_no_ticker_and_no_candles_is_a_clear_error() -> None:
    with pytest.raises(SnapshotUnavailable, match="no ticker"):
        snapshot_from_frames(inst_id=INST, as_of=datetime(2024, 1, 1, tzinfo=UTC), source="replay",
                             candles={"1H": None})


def test_the_outage_run_and_gaps_do_not_break_a_snapshot(shared_data: Path) -> None:
    raw = pd.read_csv(shared_data / "okx_BTC-USDT-SWAP_5m_2022.csv.gz")
    five = raw[["open", "high", "low", "close", "volume"]].astype(float)
    five.index = pd.to_datetime(raw["ts"], unit="ms", utc=True)
    agg = {"open": "first", "high": "max", "low": "min", "close": "last", "volume": "sum"}
    frames = {tf: five.resample(rule, label="left", closed="left").agg(agg).dropna()
              for tf, rule in (("15m", "15min"), ("1H", "1h"), ("4H", "4h"))}
    frames["1H"] = frames["1H"].drop(frames["1H"].index[-40:-30])  # a gap
    for as_of in (datetime(2022, 12, 18, 12, 0, tzinfo=UTC), datetime(2022, 12, 18, 19, 0, tzinfo=UTC)):
        snap = snapshot_from_frames(inst_id=INST, as_of=as_of, source="replay", candles=frames)
        assert no_nan_anywhere(json.loads(snap.to_json()))
        assert snap.timeframes["15m"].candles_used == 1000
    assert snap.timeframes["15m"].indicators.volume_vs_avg is not None  # trading resumed at 18:45


def test_anomalies_flag_a_big_move_and_a_funding_spike() -> None:
    idx = pd.date_range("2024-01-01", periods=300, freq="15min", tz="UTC")
    close = np.full(300, 100.0)
    close[-2:] = 104.0  # +4% in the last half hour
    frame = pd.DataFrame({"open": close, "high": close, "low": close, "close": close, "volume": 1.0}, index=idx)
    as_of = idx[-1].to_pydatetime() + timedelta(minutes=15)
    funding = FundingRate(inst_id=INST, ts=as_of, rate=Decimal("0.0006"), next_funding_time=None)
    snap = snapshot_from_frames(inst_id=INST, as_of=as_of, source="replay", candles={"15m": frame}, funding=funding)
    assert snap.price_change_1h_pct == pytest.approx(0.04)
    assert snap.anomalies.move_1h and snap.anomalies.funding_spike and not snap.anomalies.oi_change_4h
    assert len(snap.anomalies.reasons) == 2
    low = snapshot_from_frames(inst_id=INST, as_of=as_of, source="replay", candles={"15m": frame},
                               funding=FundingRate(inst_id=INST, ts=as_of, rate=Decimal("-0.0004"),
                                                   next_funding_time=None))
    assert low.anomalies.funding_spike and "below" in low.anomalies.reasons[-1]
    assert snap.regime == "unknown"  # no 1H timeframe given


def test_book_imbalance_and_spread() -> None:
    as_of = datetime(2024, 1, 1, tzinfo=UTC)
    book = OrderBook(inst_id=INST, ts=as_of,
                     bids=tuple(BookLevel(Decimal(100 - i), Decimal(3)) for i in range(6)),
                     asks=tuple(BookLevel(Decimal("100.5") + i, Decimal(1)) for i in range(6)))
    ticker = Ticker(inst_id=INST, ts=as_of, last=Decimal("100.2"), bid=Decimal(100), ask=Decimal("100.5"),
                    open_24h=Decimal(50), high_24h=None, low_24h=None, volume_24h=None)
    snap = snapshot_from_frames(inst_id=INST, as_of=as_of, source="okx", candles={}, ticker=ticker, order_book=book)
    assert snap.order_book is not None
    assert len(snap.order_book.bids) == 5 and len(snap.order_book.asks) == 5
    assert snap.order_book.imbalance == pytest.approx((15 - 5) / 20)
    assert snap.order_book.spread == Decimal("0.5")
    assert snap.ticker.change_24h_pct == pytest.approx(100.2 / 50 - 1)


def test_snapshot_build_on_the_synthetic_feed() -> None:
    from market.feeds.synthetic import SyntheticFeed

    clock = datetime(2024, 2, 20, 10, 7, tzinfo=UTC)
    feed = SyntheticFeed(seed=3, start=datetime(2024, 1, 1, tzinfo=UTC), end=datetime(2024, 3, 1, tzinfo=UTC),
                         clock=clock)
    snap = snapshot_build(feed=feed, inst_id=INST)
    assert snap.ts == clock and snap.source == "synthetic"
    assert set(snap.timeframes) == {"15m", "1H", "4H"}
    assert snap.timeframes["15m"].last_closed_ts == datetime(2024, 2, 20, 9, 45, tzinfo=UTC)
    assert snap.timeframes["1H"].last_closed_ts == datetime(2024, 2, 20, 9, 0, tzinfo=UTC)
    assert snap.open_interest is not None and snap.oi_change_4h_pct is not None
    assert snap.funding_rate is not None
    assert no_nan_anywhere(json.loads(snap.to_json()))
    earlier = snapshot_build(feed=feed, inst_id=INST, as_of=clock - timedelta(hours=3))
    assert earlier.timeframes["1H"].last_closed_ts == datetime(2024, 2, 20, 6, 0, tzinfo=UTC)


@dataclass
class BrokenPartsFeed:
    """A feed at the network boundary whose optional endpoints fail (the OKX failure modes)."""

    inner: object
    name: str = "okx"
    calls: list[str] = field(default_factory=list)

    def now(self) -> datetime:
        return self.inner.now()

    def instruments(self, inst_type: str = "SWAP"):
        return self.inner.instruments(inst_type)

    def candles(self, inst_id, timeframe, *, limit=300, before=None):
        if timeframe == "4H":
            raise FeedTemporaryError("HTTP 503", http_status=503)
        return self.inner.candles(inst_id, timeframe, limit=limit, before=before)

    def ticker(self, inst_id):
        return self.inner.ticker(inst_id)

    def order_book(self, inst_id, depth=5):
        raise FeedTemporaryError("timeout")

    def funding_rate(self, inst_id):
        raise FeedPermanentError("51001 instrument does not exist", code="51001")

    def open_interest(self, inst_id):
        raise FeedTemporaryError("HTTP 429", http_status=429)


def test_feed_errors_on_optional_parts_degrade_to_none() -> None:
    from market.feeds.synthetic import SyntheticFeed

    clock = datetime(2024, 2, 20, 10, 0, tzinfo=UTC)
    inner = SyntheticFeed(seed=3, start=datetime(2024, 1, 1, tzinfo=UTC), end=datetime(2024, 3, 1, tzinfo=UTC),
                          clock=clock)
    snap = snapshot_build(feed=BrokenPartsFeed(inner), inst_id=INST)
    assert snap.order_book is None and snap.funding_rate is None and snap.open_interest is None
    assert snap.oi_change_4h_pct is None and not snap.anomalies.any
    assert snap.timeframes["4H"].candles_used == 0 and snap.timeframes["4H"].regime == "unknown"
    assert snap.timeframes["1H"].candles_used == 1000
    assert snap.source == "okx"


def test_the_snapshot_command_prints_text_and_json(capsys, settings) -> None:
    from django.core.management import call_command

    call_command("snapshot", "--inst", INST, "--source", "synthetic")
    text = capsys.readouterr().out
    assert INST in text and "[1H]" in text and "regime" in text
    call_command("snapshot", "--inst", INST, "--source", "synthetic", "--json")
    data = json.loads(capsys.readouterr().out)
    assert data["inst_id"] == INST and set(data["timeframes"]) == {"15m", "1H", "4H"}
    assert no_nan_anywhere(data)


def test_the_replay_series_view_equals_timeframe_view_at_every_kind_of_point(real_frames) -> None:
    # TimeframeSeries is the replay's numpy path: field for field what timeframe_view gives
    # (the window-dependent columns included) at the start of history, inside the first window,
    # right after it and deep into the data, for every timeframe.
    from market.snapshot import TimeframeSeries, timeframe_view

    for tf, frame in real_frames.items():
        candles = frame.loc[:"2024-06-01"]
        computed = indicators_compute(candles)
        series = TimeframeSeries(timeframe=tf, candles=candles, computed=computed, window=1000, recent=5)
        assert series.fast
        duration = {"15m": timedelta(minutes=15), "1H": timedelta(hours=1), "4H": timedelta(hours=4)}[tf]
        # A run of consecutive points (the views share recent candles) and a step back after it.
        for end in (0, 1, 30, 999, 1000, 1001, *range(1777, 1807), 1001, len(candles) - 1, len(candles)):
            as_of = (candles.index[end - 1].to_pydatetime() + duration + timedelta(minutes=1) if end
                     else candles.index[0].to_pydatetime())
            assert series.closed_count(as_of) == end
            fast = series.view(end, as_of)
            slow = timeframe_view(timeframe=tf, candles=candles, as_of=as_of, computed=computed, window=1000, recent=5)
            assert fast == slow, (tf, end)
            assert fast.model_dump_json() == slow.model_dump_json(), (tf, end)


def test_the_replay_series_falls_back_when_its_shortcut_does_not_hold(real_frames) -> None:
    # A window shorter than CONVERGED_AFTER_BARS: every view is the trailing-window computation itself.
    from market.snapshot import TimeframeSeries, timeframe_view

    candles = real_frames["4H"].loc[:"2024-06-01"]
    computed = indicators_compute(candles)
    series = TimeframeSeries(timeframe="4H", candles=candles, computed=computed, window=300, recent=5)
    assert not series.fast
    as_of = candles.index[-1].to_pydatetime() + timedelta(hours=4)
    assert series.view(series.closed_count(as_of), as_of) == timeframe_view(
        timeframe="4H", candles=candles, as_of=as_of, computed=computed, window=300, recent=5)


def test_an_indicator_set_built_without_validation_equals_the_validated_one(real_frames) -> None:
    from market.indicators import indicator_set_from_row
    from market.schemas import IndicatorSet

    row = indicators_compute(real_frames["1H"].loc[:"2024-06-01"]).iloc[-1].to_dict()
    built = indicator_set_from_row(row)
    assert built == IndicatorSet.model_validate(built.model_dump())
    assert IndicatorSet.model_validate_json(built.model_dump_json()) == built


LATE_START = timedelta(days=3)


def _replay_parts(timeframes: tuple[str, ...], *, empty: tuple[str, ...] = (), late: tuple[str, ...] = ()) -> tuple[
        ReplayFeed, datetime, dict[str, pd.DataFrame], dict[str, pd.DataFrame], dict[str, TimeframeSeries]]:
    """A 5m replay feed on seeded data and, as tradebot.replay.FrameSnapshots builds them, its whole-history
    frames, their indicators and the TimeframeSeries over those very frames (`empty`: a frame with no rows;
    `late`: a frame starting LATE_START after the data, as a live 15m window is shorter than the 1H one)."""
    rng = np.random.default_rng(42)
    n = 25 * 288  # 25 days of 5m bars
    start = datetime(2024, 4, 1, tzinfo=UTC)
    ts = int(start.timestamp() * 1000) + np.arange(n, dtype=np.int64) * 300_000
    close = 60_000 * np.exp(np.cumsum(rng.normal(0, 0.004, n)))  # moves of 1% an hour and more: some anomalies
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.001, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.001, n)))
    keep = np.ones(n, dtype=bool)
    keep[3000:3050] = False  # an outage: no 15m or 1H candles for hours
    keep[rng.choice(n, size=30, replace=False)] = False  # single missing bars: their 15m and 1H buckets are gaps
    feed = ReplayFeed()
    feed.add_series(INST, "5m", ts=ts[keep], open=np.round(open_[keep], 1), high=np.round(high[keep], 1),
                    low=np.round(low[keep], 1), close=np.round(close[keep], 1), volume=rng.uniform(1, 50, n)[keep])
    until = start + timedelta(days=25)
    feed.set_clock(until)
    frames: dict[str, pd.DataFrame] = {}
    computed: dict[str, pd.DataFrame] = {}
    series: dict[str, TimeframeSeries] = {}
    window = int(django_settings.INDICATOR_HISTORY_CANDLES)
    for tf in timeframes:
        frame = feed.frame(INST, tf, limit=10_000_000)
        frame = frame.iloc[:0] if tf in empty else frame.loc[start + LATE_START:] if tf in late else frame
        frames[tf] = frame
        if not frame.empty:
            computed[tf] = indicators_compute(frame)
        series[tf] = TimeframeSeries(timeframe=tf, candles=frame, computed=computed.get(tf), window=window,
                                     recent=int(django_settings.SNAPSHOT_RECENT_CANDLES))
    return feed, start, frames, computed, series


def _clocks(start: datetime) -> list[datetime]:
    rng = np.random.default_rng(5)
    early = [start + timedelta(minutes=5 * k) for k in range(1, 40)]  # the first hours: nothing closed an hour before
    early += [start + LATE_START + timedelta(minutes=5 * k) for k in range(1, 30)]  # the first hours of a late frame
    aligned = [start + timedelta(days=9, minutes=5 * k) for k in range(150)]  # a replay's cycles, 15m closes among them
    outage = [start + timedelta(minutes=5 * k) for k in range(2990, 3080, 3)]  # into and out of the outage
    anywhere = [start + timedelta(seconds=int(s), microseconds=int(us))  # not on any candle boundary
                for s, us in zip(rng.integers(600, 25 * 86_400, 120), rng.integers(0, 1_000_000, 120), strict=True)]
    return early + aligned + outage + anywhere


@pytest.mark.parametrize(("timeframes", "empty", "late"), [
    (("15m", "1H", "4H"), (), ()),  # the 15m candles give the change
    (("1H", "4H"), (), ()),  # no 15m key: the 1H candles give it
    (("15m", "1H", "4H"), ("15m",), ()),  # an empty 15m frame: the 1H candles give it
    (("15m", "1H", "4H"), (), ("15m",)),  # 15m candles, none an hour before the clock, 1H ones: no change
], ids=["15m", "no 15m key", "empty 15m frame", "15m frame starting after the 1H one"])
def test_the_replay_series_give_the_same_snapshot_as_the_frames_alone(timeframes: tuple[str, ...],
                                                                      empty: tuple[str, ...],
                                                                      late: tuple[str, ...]) -> None:
    # FrameSnapshots passes its TimeframeSeries so price_change_1h reads their numpy arrays:
    # the snapshot must be the one the frames alone give, whatever the clock.
    feed, start, frames, computed, series = _replay_parts(timeframes, empty=empty, late=late)
    changes: list[float | None] = []
    for i, as_of in enumerate(_clocks(start)):
        feed.set_clock(as_of)
        # Without a ticker (once a candle has closed) the price is the last close.
        ticker = None if i % 3 == 1 and as_of >= start + timedelta(hours=5) else feed.ticker(INST)
        common = dict(inst_id=INST, as_of=as_of, source="replay", candles=frames, computed=computed, ticker=ticker,
                      window=int(django_settings.INDICATOR_HISTORY_CANDLES))
        alone = snapshot_from_frames(**common)
        with_series = snapshot_from_frames(**common, series=series)
        assert with_series.model_dump() == alone.model_dump(), as_of
        assert repr(with_series) == repr(alone), as_of
        changes.append(alone.price_change_1h_pct)
    # Every kind of answer was met: none (no candle closed an hour before), moves, and anomalous moves.
    assert None in changes
    moves = [c for c in changes if c is not None]
    assert len(moves) > 200 and len(set(moves)) > 100
    assert any(abs(c) > 0.02 for c in moves)
