"""COLLECTING with the stream behind it: stored candles and live rows while fresh (no REST), REST when not; live OI change."""
from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from journal.models import Cycle, CycleState
from market.feeds.base import Bar
from market.feeds.okx import OkxFeed
from market.models import Instrument, LiveMarket, OpenInterestSample, StreamStatus
from market.services import candles_upsert
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_market import CANDLES, HISTORY_CANDLES, TICKER, OkxMarketFake, candle_rows
from tradebot.stages import CycleWork, StageEnv, collect

pytestmark = pytest.mark.django_db
BTC = "BTC-USDT-SWAP"
AS_OF = datetime(2026, 12, 4, 12, 0, 10, tzinfo=UTC)
WINDOW = 60
STEPS = {"15m": 900, "1H": 3600, "4H": 14400}


@pytest.fixture
def btc(settings) -> Instrument:  # noqa: ANN001
    settings.INDICATOR_HISTORY_CANDLES = WINDOW
    settings.STREAM_FRESH_SECONDS = 120
    settings.OI_CHANGE_4H_PCT = Decimal("0.10")
    return Instrument.objects.create(inst_id=BTC, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
                                     tick_sz=Decimal("0.1"), trading_enabled=True)


def store_window(inst: Instrument) -> None:
    """A full window of closed bars per timeframe, the last one closing at or before AS_OF (as the stream keeps them)."""
    for tf, step in STEPS.items():
        epoch = int(AS_OF.timestamp())
        last_open = datetime.fromtimestamp(epoch - epoch % step - step, tz=UTC)
        bars = []
        for i in range(WINDOW):
            ts = last_open - timedelta(seconds=step * (WINDOW - 1 - i))
            c = Decimal(str(round(60000 + 500 * math.sin(i / 7), 1)))
            bars.append(Bar(ts=ts, open=c - 5, high=c + 20, low=c - 20, close=c, volume=Decimal("12.5")))
        candles_upsert(instrument=inst, timeframe=tf, bars=bars)


def streams_up(*, business: bool = True) -> None:
    now = timezone.now()
    for name, connected in (("public", True), ("business", business)):
        StreamStatus.objects.update_or_create(name=name, defaults={"connected": connected, "updated_at": now,
                                                                   "last_message_at": now})


def live_row(inst: Instrument) -> None:
    ts = AS_OF - timedelta(seconds=5)
    LiveMarket.objects.create(instrument=inst, last=Decimal("60100.5"), bid=Decimal("60100.4"), ask=Decimal("60100.6"),
                              ticker_ts=ts, book={"bids": [["60100.4", "12"]], "asks": [["60100.6", "9"]]}, book_ts=ts,
                              funding_rate=Decimal("0.0001"), funding_ts=ts, oi=Decimal("5000"), oi_ts=ts, updated_at=ts)
    OpenInterestSample.objects.create(instrument=inst, ts=AS_OF - timedelta(hours=4, minutes=2), oi=Decimal("4000"))


def work_for(inst: Instrument) -> CycleWork:
    cycle = Cycle.objects.create(instrument=inst, as_of=AS_OF, state=CycleState.COLLECTING,
                                 stage_times={CycleState.COLLECTING: {"started": AS_OF.isoformat()}})
    return CycleWork(cycle=Cycle.objects.select_related("instrument").get(pk=cycle.pk))


def test_collecting_reads_the_fresh_stream_without_rest_and_gets_the_live_oi_change(btc) -> None:
    store_window(btc)
    streams_up()
    live_row(btc)
    with FakeHttpServer() as http:  # no routes: any REST call would be a 404 and show in http.requests
        feed = OkxFeed(base_url=http.url, flag="1")
        work = work_for(btc)
        assert collect(work, StageEnv(feed=feed, exchange=None))
        assert http.requests == []
        feed.close()
    sources = work.cycle.stage_times[CycleState.COLLECTING]["sources"]
    assert sources == {"candles": "stream", "ticker": "stream", "book": "stream", "funding": "stream",
                       "open_interest": "stream"}
    snap = work.snapshot
    assert snap.price == Decimal("60100.5") and snap.order_book is not None and snap.order_book.spread == Decimal("0.2")
    assert snap.timeframes["1H"].candles_used == WINDOW and snap.timeframes["15m"].indicators.rsi_14 is not None
    assert snap.oi_change_4h_pct == pytest.approx(0.25)
    assert snap.anomalies.oi_change_4h and any("open interest +25.00%" in r for r in snap.anomalies.reasons)


def test_collecting_falls_back_to_rest_when_the_stream_is_down_and_says_so(btc) -> None:
    store_window(btc)
    streams_up(business=False)
    live_row(btc)
    with FakeHttpServer() as http:
        market = OkxMarketFake(http)
        as_of_ms = int(AS_OF.timestamp() * 1000)
        market.candles_by_bar({tf: candle_rows(start_ms=as_of_ms - (WINDOW + 5) * s * 1000, count=WINDOW + 6,
                                               step_ms=s * 1000) for tf, s in STEPS.items()})
        feed = OkxFeed(base_url=http.url, flag="1")
        work = work_for(btc)
        assert collect(work, StageEnv(feed=feed, exchange=None))
        candle_calls = len(market.calls(CANDLES)) + len(market.calls(HISTORY_CANDLES))
        feed.close()
    sources = work.cycle.stage_times[CycleState.COLLECTING]["sources"]
    assert sources["candles"] == "rest (the business stream is disconnected)"
    assert sources["ticker"] == "stream"  # the public connection is up: its parts still come from it
    assert candle_calls >= 3 and not market.calls(TICKER)


def test_streams_health_names_each_connection_that_is_not_up(settings) -> None:
    from market.selectors import streams_health

    settings.STREAM_FRESH_SECONDS = 120
    assert streams_health() == {"running": False, "ok": False, "problems": [], "streams": {}}  # never ran here
    now = timezone.now()
    for name, connected, stopped, error in (("public", True, False, ""), ("business", False, False, "ConnectionClosed"),
                                            ("private", False, True, "OKX refused the WebSocket login (code 60009)")):
        StreamStatus.objects.create(name=name, connected=connected, stopped=stopped, error=error, reconnects=2,
                                    updated_at=now)
    health = streams_health(now=now)
    assert health["running"] and not health["ok"]
    assert health["streams"] == {
        "public": "up", "business": "business: disconnected, reconnecting (2 reconnects): ConnectionClosed",
        "private": "private: stopped: OKX refused the WebSocket login (code 60009)"}
    later = streams_health(now=now + timedelta(minutes=10))
    assert not later["running"] and later["problems"][0] == (
        "business: status 600s old (manage.py stream_okx is not running)")
