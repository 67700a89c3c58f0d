"""OkxFeed through python-okx against a real HTTP server on 127.0.0.1 serving OKX's own bodies."""
from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from market.feeds import MarketUnavailable, feed_from_settings
from market.feeds.base import FeedDataError, FeedPermanentError, FeedTemporaryError
from market.feeds.okx import OkxFeed, RateLimiter, call_with_retries
from market.feeds.synthetic import SyntheticFeed
from tests.conftest import FIXTURES
from tests.fakes.http_server import FakeHttpServer, Reply
from tests.fakes.okx_market import (
    BOOKS,
    CANDLES,
    FUNDING_RATE,
    HISTORY_CANDLES,
    INSTRUMENTS,
    OPEN_INTEREST,
    TICKER,
    TIME,
    OkxMarketFake,
    candle_rows,
)

BTC = "BTC-USDT-SWAP"
T0 = 1_700_000_000_000 // 900_000 * 900_000  # a 15m-aligned epoch ms


@pytest.fixture(scope="module")
def okx_server() -> Iterator[FakeHttpServer]:
    with FakeHttpServer() as server:  # one server per module: stopping one takes half a second
        yield server


@pytest.fixture
def okx(okx_server: FakeHttpServer) -> OkxMarketFake:
    return OkxMarketFake(okx_server).reset()


@pytest.fixture
def feed(okx: OkxMarketFake) -> Iterator[OkxFeed]:
    f = OkxFeed(base_url=okx.url, timeout=2.0)
    yield f
    f.close()


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


# --- candles ---------------------------------------------------------------
def test_it_parses_real_btc_candles_oldest_first_with_base_currency_volume(okx, feed, okx_samples: Path) -> None:
    okx.sample(CANDLES, okx_samples / "market_candles.nautilus_fixture_BTC-USDT-SWAP_1m.json")
    bars = feed.candles(BTC, "1m", limit=2)
    assert [ms(b.ts) for b in bars] == [1747093980000, 1747094040000]
    assert bars[-1].open == Decimal("102806.1") and bars[-1].close == Decimal("102820.4")
    assert bars[-1].volume == Decimal("10.4037")  # volCcy (BTC), not 1040.37 contracts
    assert all(b.confirmed for b in bars)
    request = okx.calls(CANDLES)[0]
    assert request.query == {"instId": BTC, "bar": "1m", "limit": "2"}
    assert request.headers["x-simulated-trading"] == "1"


def test_it_keeps_an_unconfirmed_bar_flagged_and_prefers_the_confirmed_row(okx, feed, okx_samples: Path) -> None:
    # OKX's documented example has two rows for one ts: confirm "0" first, then "1".
    okx.sample(CANDLES, okx_samples / "market_candles.okxdoc.json")
    okx.reply(HISTORY_CANDLES, Reply(200, {"code": "0", "msg": "", "data": []}))
    bars = feed.candles("X", "15m", limit=5)
    assert len(bars) == 1 and bars[0].confirmed and bars[0].close == Decimal("3.72")
    page = feed.candle_page("X", "15m")
    assert [b.confirmed for b in page] == [False, True]


def test_it_reads_history_candles(okx, feed, okx_samples: Path) -> None:
    okx.sample(HISTORY_CANDLES, okx_samples / "market_history-candles.okxdoc.json")
    page = feed.candle_page(BTC, "1H", history=True, limit=500)
    assert len(page) == 2 and all(b.confirmed for b in page)
    assert okx.calls(HISTORY_CANDLES)[0].query["limit"] == "100"  # the endpoint's cap


def test_it_pages_backwards_with_the_after_cursor(okx, feed) -> None:
    rows = candle_rows(start_ms=T0, count=1000, step_ms=900_000)
    okx.candle_store(rows)
    bars = feed.candles(BTC, "15m", limit=650)
    assert len(bars) == 650
    assert [ms(b.ts) for b in bars] == [T0 + i * 900_000 for i in range(350, 1000)]
    assert not bars[-1].confirmed and all(b.confirmed for b in bars[:-1])
    calls = okx.calls(CANDLES)
    assert [c.query.get("limit") for c in calls] == ["300", "300", "50"]
    assert "after" not in calls[0].query
    assert calls[1].query["after"] == str(T0 + 700 * 900_000)


def test_it_continues_on_history_candles_when_recent_candles_run_out(okx, feed) -> None:
    rows = candle_rows(start_ms=T0, count=500, step_ms=900_000)
    okx.candle_store(rows[:200], history_rows=rows)  # /market/candles keeps only the newest 200
    bars = feed.candles(BTC, "15m", limit=450)
    assert [ms(b.ts) for b in bars] == [T0 + i * 900_000 for i in range(50, 500)]
    assert len(okx.calls(HISTORY_CANDLES)) == 3  # 100 + 100 + 50


def test_before_means_bars_opening_strictly_before(okx, feed) -> None:
    okx.candle_store(candle_rows(start_ms=T0, count=100, step_ms=900_000))
    cutoff = datetime.fromtimestamp((T0 + 40 * 900_000) / 1000, tz=UTC)
    bars = feed.candles(BTC, "15m", limit=10, before=cutoff)
    assert [ms(b.ts) for b in bars] == [T0 + i * 900_000 for i in range(30, 40)]


def test_a_garbage_number_is_a_data_error_naming_the_field(okx, feed) -> None:
    row = candle_rows(start_ms=T0, count=1, step_ms=60_000)[0]
    row[3] = "abc"
    okx.reply(CANDLES, Reply(200, {"code": "0", "msg": "", "data": [row]}))
    with pytest.raises(FeedDataError, match="low"):
        feed.candles(BTC, "1m", limit=1)


# --- ticker, books, funding, open interest, instruments ------------------------
def test_it_reads_the_ticker(okx, feed, okx_samples: Path) -> None:
    okx.sample(TICKER, okx_samples / "market_ticker.okxdoc.json")
    t = feed.ticker("BTC-USD-SWAP")
    assert (t.last, t.bid, t.ask, t.open_24h, t.volume_24h) == (
        Decimal("9999.99"), Decimal("8888.88"), Decimal("9999.99"), Decimal("9000"), Decimal("2222"))
    assert t.ts == datetime.fromtimestamp(1597026383.085, tz=UTC)


def test_it_reads_the_order_book_top(okx, feed, okx_samples: Path) -> None:
    okx.sample(BOOKS, okx_samples / "market_books.okxdoc.json")
    book = feed.order_book(BTC, depth=5)
    assert book.asks[0].price == Decimal("41006.8") and book.bids[0].size == Decimal("0.30178218")
    assert okx.calls(BOOKS)[0].query["sz"] == "5"


def test_it_reads_the_funding_rate_and_next_funding_time(okx, feed, okx_samples: Path) -> None:
    okx.sample(FUNDING_RATE, okx_samples / "public_funding-rate.okxdoc.json")
    f = feed.funding_rate(BTC)
    assert f.rate == Decimal("0.0000182221218054")
    assert f.next_funding_time == datetime.fromtimestamp(1743638400, tz=UTC)
    assert f.next_rate is None  # "" in the real body


def test_empty_funding_strings_become_none(okx, feed) -> None:
    okx.sample(FUNDING_RATE, FIXTURES / "okx" / "public_funding-rate.empty_strings.json")
    f = feed.funding_rate(BTC)
    assert f.rate is None and f.next_rate is None
    assert f.next_funding_time == datetime.fromtimestamp(1743609600, tz=UTC)  # falls back to fundingTime


def test_it_reads_open_interest(okx, feed, okx_samples: Path) -> None:
    okx.sample(OPEN_INTEREST, okx_samples / "public_open-interest.okxdoc.json")
    oi = feed.open_interest(BTC)
    assert (oi.oi_contracts, oi.oi_ccy, oi.oi_usd) == (Decimal("5000"), Decimal("555.55"), Decimal("50000"))
    assert okx.calls(OPEN_INTEREST)[0].query == {"instType": "SWAP", "instId": BTC}


def test_instrument_specs_come_from_the_venue_not_code(okx, feed, okx_samples: Path) -> None:
    okx.sample(INSTRUMENTS, okx_samples / "public_instruments_SWAP.nautilus_fixture.json")
    now = {s.inst_id: s for s in feed.instruments("SWAP")}
    okx.sample(INSTRUMENTS, okx_samples / "public_instruments_SWAP.capture_cryptofeed_20220513.json")
    then = {s.inst_id: s for s in feed.instruments("SWAP")}
    assert (now[BTC].ct_val, now[BTC].lot_sz, now[BTC].min_sz, now[BTC].tick_sz) == (
        Decimal("0.01"), Decimal("0.01"), Decimal("0.01"), Decimal("0.1"))
    assert (then[BTC].lot_sz, then[BTC].min_sz, then[BTC].max_lever) == (Decimal("1"), Decimal("1"), Decimal("125"))
    assert len(then) == 166 and then["ETH-USDT-SWAP"].ct_val == Decimal("0.1")
    assert okx.calls(INSTRUMENTS)[0].query == {"instType": "SWAP"}


def test_an_instrument_row_with_empty_sizes_is_skipped_not_fatal(okx, feed, okx_samples: Path) -> None:
    okx.sample(INSTRUMENTS, okx_samples / "public_instruments.okxdoc.json")  # a SPOT row: ctVal ""
    assert feed.instruments("SPOT") == []


# --- errors ----------------------------------------------------------------
def test_http_401_is_permanent(okx, feed, okx_samples: Path) -> None:
    okx.sample(TICKER, okx_samples / "error_http401_invalid_access_key.nautilus_fixture.json", status=401)
    with pytest.raises(FeedPermanentError) as err:
        feed.ticker(BTC)
    assert err.value.http_status == 401 and err.value.code == "50111" and not err.value.retryable


def test_http_429_is_temporary(okx, feed, okx_samples: Path) -> None:
    okx.sample(CANDLES, okx_samples / "error_http429_rate_limit.nautilus_fixture.json", status=429)
    with pytest.raises(FeedTemporaryError) as err:
        feed.candles(BTC, "15m", limit=10)
    assert err.value.code == "50011" and err.value.retryable


def test_a_51xxx_code_is_permanent(okx, feed, okx_samples: Path) -> None:
    documented = json.loads((okx_samples / "error_codes.okxdoc.json").read_text())["51001"][0]
    okx.reply(TICKER, Reply(200, {"code": "51001", "msg": documented["Error Message"], "data": []}))
    with pytest.raises(FeedPermanentError, match="51001") as err:
        feed.ticker("NOPE-USDT-SWAP")
    assert not isinstance(err.value, FeedTemporaryError)


@pytest.mark.parametrize("code", ["50001", "50004", "50011", "50013", "50026"])
def test_busy_codes_in_a_200_body_are_temporary(okx, feed, code: str) -> None:
    okx.reply(TICKER, Reply(200, {"code": code, "msg": "busy", "data": []}))
    with pytest.raises(FeedTemporaryError):
        feed.ticker(BTC)


def test_a_5xx_html_page_is_temporary(okx, feed) -> None:
    okx.reply(TICKER, Reply(502, "<html><body><h1>502 Bad Gateway</h1></body></html>", {"Content-Type": "text/html"}))
    with pytest.raises(FeedTemporaryError) as err:
        feed.ticker(BTC)
    assert err.value.http_status == 502
    assert isinstance(err.value.__cause__, ValueError)  # raise ... from the JSON error


def test_a_non_json_200_body_is_a_data_error(okx, feed) -> None:
    okx.reply(TICKER, Reply(200, "maintenance"))
    with pytest.raises(FeedDataError):
        feed.ticker(BTC)


def test_http_404_is_permanent(okx, feed, okx_samples: Path) -> None:
    okx.sample(TICKER, okx_samples / "error_http404_not_found.nautilus_fixture.json", status=404)
    with pytest.raises(FeedPermanentError):
        feed.ticker(BTC)


def test_a_timeout_is_temporary(okx) -> None:
    okx.reply(TICKER, Reply(200, {"code": "0", "msg": "", "data": []}, delay=1.0))
    slow = OkxFeed(base_url=okx.url, timeout=0.2)
    with pytest.raises(FeedTemporaryError, match="timed out"):
        slow.ticker(BTC)


def test_a_refused_connection_is_temporary() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FeedTemporaryError, match="connection failed"):
        OkxFeed(base_url=f"http://127.0.0.1:{port}", timeout=1.0).ticker(BTC)


# --- retries and rate limits -------------------------------------------------
def test_retries_recover_from_a_429_then_succeed(okx, feed, okx_samples: Path) -> None:
    okx.reply(TICKER, Reply(429, {"code": "50011", "msg": "Too Many Requests"}),
              Reply(200, json.loads((okx_samples / "market_ticker.okxdoc.json").read_text())))
    sleeps: list[float] = []
    ticker = call_with_retries(lambda: feed.ticker(BTC), attempts=3, sleep=sleeps.append)
    assert ticker.last == Decimal("9999.99") and len(sleeps) == 1 and len(okx.calls(TICKER)) == 2


def test_retries_give_up_and_never_retry_a_permanent_error(okx, feed) -> None:
    okx.reply(TICKER, Reply(503, "<html>down</html>"))
    with pytest.raises(FeedTemporaryError):
        call_with_retries(lambda: feed.ticker(BTC), attempts=3, sleep=lambda _: None)
    assert len(okx.calls(TICKER)) == 3
    okx.reply(CANDLES, Reply(200, {"code": "51000", "msg": "Parameter bar error", "data": []}))
    with pytest.raises(FeedPermanentError):
        call_with_retries(lambda: feed.candles(BTC, "15m"), attempts=3, sleep=lambda _: None)
    assert len(okx.calls(CANDLES)) == 1


def test_the_rate_limiter_holds_the_41st_candle_request_in_two_seconds() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    limiter = RateLimiter(40, 2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(40):
        assert limiter.acquire() == 0.0
    now[0] = 0.5
    assert limiter.acquire() == pytest.approx(1.5)
    assert slept == [pytest.approx(1.5)]


# --- choosing the source ---------------------------------------------------
def test_auto_uses_okx_when_the_probe_answers(okx, settings) -> None:
    okx.reply(TIME, Reply(200, {"code": "0", "msg": "", "data": [{"ts": "1743588686291"}]}))
    settings.OKX_BASE_URL = okx.url
    feed = feed_from_settings(source="auto")
    assert isinstance(feed, OkxFeed) and feed.base_url == okx.url


def test_auto_never_falls_back_to_the_synthetic_market_when_okx_is_down(okx, settings) -> None:
    # #16: a made-up market must not be presented as the market; synthetic only when asked for.
    okx.reply(TIME, Reply(503, "<html>maintenance</html>"))
    settings.OKX_BASE_URL = okx.url
    with pytest.raises(MarketUnavailable, match="no market data: OKX at .* did not answer") as caught:
        feed_from_settings(source="auto")
    assert "--source synthetic" in str(caught.value)
    assert isinstance(feed_from_settings(source="synthetic"), SyntheticFeed)


@pytest.mark.django_db
def test_snapshot_without_market_data_says_so_and_exits_non_zero_unless_synthetic_is_asked_for(
        okx, settings, capsys) -> None:
    from django.core.management import CommandError, call_command

    from market.models import Candle

    okx.reply(TIME, Reply(503, "<html>maintenance</html>"))
    settings.OKX_BASE_URL = okx.url
    settings.MARKET_DATA_SOURCE = "auto"
    assert not Candle.objects.exists()  # an empty database
    for command in (["snapshot", "--inst", BTC], ["backfill", "--inst", BTC, "--limit", "5", "--no-progress"]):
        with pytest.raises(CommandError, match="no market data") as caught:  # Django exits 1 on a CommandError
            call_command(*command)
        assert "--source synthetic" in str(caught.value)
    printed = capsys.readouterr().out
    assert "price" not in printed and "synthetic" not in printed, printed
    assert not Candle.objects.exists(), "backfill stored synthetic candles as the market"
    call_command("snapshot", "--inst", BTC, "--source", "synthetic")
    assert "(source synthetic)" in capsys.readouterr().out
