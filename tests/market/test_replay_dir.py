"""OKX history into a replay directory and back: what `manage.py demo` hands its workers (MARKET_DATA_SOURCE=replay)."""
from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from market.feeds import feed_from_settings
from market.feeds.base import FeedPermanentError
from market.feeds.okx import OkxFeed
from market.feeds.replay import ReplayFeed, replay_dir_write
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_market import FUNDING_RATE_HISTORY, HISTORY_CANDLES, OkxMarketFake, funding_rows_from_csv

BTC = "BTC-USDT-SWAP"
OKX_NOW = datetime(2026, 1, 15, 20, 7, tzinfo=UTC)  # inside a 15m bar: OKX sends it unconfirmed


@pytest.fixture(scope="module")
def okx_now(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OkxMarketFake]:
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real market data not found at {SHARED_DATA}")
    with FakeHttpServer() as server:
        fake = OkxMarketFake(server)
        fake.real_market(SHARED_DATA, until=OKX_NOW)
        yield fake


@pytest.fixture
def okx(okx_now: OkxMarketFake) -> Iterator[OkxFeed]:
    feed = OkxFeed(base_url=okx_now.url, timeout=5.0)
    yield feed
    feed.close()


def test_funding_history_pages_back_oldest_first_with_the_recorded_rates(okx: OkxFeed, okx_now: OkxMarketFake,
                                                                          shared_data: Path) -> None:
    okx_now.server.requests.clear()
    rates = okx.funding_rate_history(BTC, limit=250)
    recorded = funding_rows_from_csv(shared_data / "okx_BTC-USDT-SWAP_funding_rate.csv", inst_id=BTC,
                                     until_ms=int(OKX_NOW.timestamp() * 1000))
    assert len(rates) == 250 and len(okx_now.calls(FUNDING_RATE_HISTORY)) == 3  # 100 + 100 + 50
    assert [r.ts for r in rates] == sorted(r.ts for r in rates)
    assert rates[-1].ts == datetime(2026, 1, 15, 16, 0, tzinfo=UTC)  # the last settlement before "now"
    assert [r.rate for r in reversed(rates)] == [Decimal(row["fundingRate"]) for row in recorded[:250]]
    before = okx.funding_rate_history(BTC, limit=3, before=rates[-1].ts)
    assert [r.ts for r in before] == [rates[-4].ts, rates[-3].ts, rates[-2].ts]


def test_a_replay_directory_gives_back_the_closed_okx_bars_funding_and_specs(okx: OkxFeed, okx_now: OkxMarketFake,
                                                                             tmp_path: Path) -> None:
    candles = {tf: okx.candles(BTC, tf, limit=n) for tf, n in (("15m", 1500), ("1H", 400), ("4H", 120))}
    assert okx_now.calls(HISTORY_CANDLES)  # 1500 15m bars: more than /market/candles keeps
    assert candles["15m"][-1].confirmed is False  # the bar forming at "now"
    funding = okx.funding_rate_history(BTC, limit=30)
    spec = next(s for s in okx.instruments("SWAP") if s.inst_id == BTC)

    path = replay_dir_write(tmp_path / "replay", name="okx-replay", instruments=[spec], candles={BTC: candles},
                            funding={BTC: funding})
    feed = ReplayFeed.from_dir(path)
    assert feed.name == "okx-replay" and feed.instruments("SWAP") == [spec]
    last_closed = candles["15m"][-2]
    assert feed.now() == last_closed.ts + timedelta(minutes=15)  # the clock starts at the last close
    for tf, bars in candles.items():
        closed = [b for b in bars if b.confirmed]
        assert feed.candles(BTC, tf, limit=len(bars)) == closed  # same times, same Decimal prices
    feed.set_clock(datetime(2026, 1, 15, 9, 0, tzinfo=UTC))
    assert feed.funding_rate(BTC).ts == datetime(2026, 1, 15, 8, 0, tzinfo=UTC)
    assert feed.funding_rate(BTC).rate == next(f.rate for f in funding if f.ts == feed.funding_rate(BTC).ts)
    assert feed.ticker(BTC).last == next(b.close for b in candles["15m"] if b.ts == datetime(2026, 1, 15, 8, 45,
                                                                                                tzinfo=UTC))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["instruments"][0]["ct_val"] == "0.01" and Decimal(manifest["instruments"][0]["ct_val"]) == spec.ct_val


def test_the_replay_source_reads_the_directory_in_the_settings(tmp_path: Path, settings) -> None:
    settings.MARKET_REPLAY_DIR = tmp_path / "nothing-here"
    with pytest.raises(FeedPermanentError, match="manifest.json is missing"):
        feed_from_settings(source="replay")
