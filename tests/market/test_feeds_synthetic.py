"""The synthetic market: reproducible, OKX-shaped, and rough enough to test the bot on."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest

from market.feeds.synthetic import REGIMES, SPECS, SyntheticFeed, SyntheticMarket

START = datetime(2025, 3, 1, tzinfo=UTC)
END = START + timedelta(days=60)
BTC, ETH = "BTC-USDT-SWAP", "ETH-USDT-SWAP"


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket(11, START, END)


def test_the_same_seed_gives_identical_data_and_another_seed_does_not(market: SyntheticMarket) -> None:
    again = SyntheticMarket(11, START, END)
    other = SyntheticMarket(12, START, END)
    for field in ("open", "high", "low", "close", "volume"):
        np.testing.assert_array_equal(market.bars[BTC][field], again.bars[BTC][field])
    np.testing.assert_array_equal(market.funding_rate, again.funding_rate)
    assert not np.array_equal(market.bars[BTC]["close"], other.bars[BTC]["close"])


def test_a_later_end_only_appends_bars(market: SyntheticMarket) -> None:
    shorter = SyntheticMarket(11, START, START + timedelta(days=10, hours=3))
    n = len(shorter.ts)
    assert n == (10 * 24 + 3) * 12
    for field in ("open", "close", "volume"):
        np.testing.assert_array_equal(shorter.bars[ETH][field], market.bars[ETH][field][:n])


def test_it_has_gaps_jumps_zero_volume_fillers_and_all_four_regimes(market: SyntheticMarket) -> None:
    bars = market.bars[BTC]
    opens_away = bars["open"][1:] != bars["close"][:-1]
    assert opens_away.sum() >= 5  # gaps
    log_ret = np.abs(np.diff(np.log(bars["close"])))
    assert (log_ret > 0.01).sum() >= 3  # jumps well beyond normal 5m moves
    flat = (bars["volume"] == 0)
    assert flat.sum() >= 3
    assert np.all(bars["open"][flat] == bars["close"][flat]) and np.all(bars["high"][flat] == bars["low"][flat])
    assert set(np.unique(market.regime)) == set(REGIMES)


def test_bars_are_well_formed_and_btc_like(market: SyntheticMarket) -> None:
    for inst, (lo, hi) in {BTC: (30_000, 250_000), ETH: (1_000, 12_000)}.items():
        b = market.bars[inst]
        assert np.all(b["high"] >= np.maximum(b["open"], b["close"]))
        assert np.all(b["low"] <= np.minimum(b["open"], b["close"]))
        assert np.all(b["volume"] >= 0) and lo < b["close"].min() and b["close"].max() < hi
    r_btc = np.diff(np.log(market.bars[BTC]["close"]))
    r_eth = np.diff(np.log(market.bars[ETH]["close"]))
    assert 0.6 < np.corrcoef(r_btc, r_eth)[0, 1] < 0.98


def test_funding_settles_every_eight_hours_and_open_interest_is_hourly(market: SyntheticMarket) -> None:
    assert np.all(np.diff(market.funding_ts) == 8 * 3_600_000)
    assert np.all(market.funding_ts % (8 * 3_600_000) == 0)
    assert np.all(np.abs(market.funding_rate) <= 0.00375)
    ts, contracts, ccy = market.open_interest(BTC)
    assert np.all(np.diff(ts) == 3_600_000) and np.all(contracts > 0)
    np.testing.assert_allclose(ccy, contracts * 0.01, rtol=1e-9)


def test_the_feed_uses_okx_shaped_specs_and_replay_clock_semantics() -> None:
    feed = SyntheticFeed(seed=3, start=START, end=START + timedelta(days=5), clock=START + timedelta(days=2, minutes=7))
    specs = {s.inst_id: s for s in feed.instruments("SWAP")}
    assert specs[BTC] == SPECS[BTC] and specs[BTC].lot_sz == Decimal("0.01") and specs[BTC].max_lever == Decimal("100")
    assert (specs[ETH].ct_val, specs[ETH].tick_sz) == (Decimal("0.1"), Decimal("0.01"))
    h4 = feed.candles(BTC, "4H", limit=100)
    assert len(h4) == 12 and h4[-1].ts + timedelta(hours=4) <= feed.now()
    assert feed.candles(BTC, "5m", limit=1)[0].ts == START + timedelta(days=2)
    assert feed.ticker(BTC).last == feed.candles(BTC, "5m", limit=1)[0].close
    assert feed.funding_rate(BTC).rate is not None and feed.open_interest(ETH).oi_contracts is not None
    assert feed.name == "synthetic" and feed.source == "SYN"
