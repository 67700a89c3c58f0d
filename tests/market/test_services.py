"""Candle and instrument writes, backfill (csv, synthetic, OKX over a fake server) and the reads."""
from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from market.feeds.base import Bar, FeedTemporaryError
from market.feeds.okx import OkxFeed
from market.feeds.replay import ReplayFeed
from market.feeds.synthetic import SyntheticFeed
from market.models import Candle, Instrument
from market.selectors import candles_frame, returns_1h
from market.services import candles_backfill, candles_sync, candles_upsert, instruments_sync
from tests.fakes.http_server import FakeHttpServer, Reply
from tests.fakes.okx_market import CANDLES, INSTRUMENTS, OkxMarketFake, candle_rows

BTC, ETH = "BTC-USDT-SWAP", "ETH-USDT-SWAP"
T0 = datetime(2025, 3, 1, tzinfo=UTC)


def bar(minutes: int, close: str = "100", confirmed: bool = True) -> Bar:
    c = Decimal(close)
    return Bar(ts=T0 + timedelta(minutes=minutes), open=c, high=c + 1, low=c - 1, close=c, volume=Decimal("2.5"),
               confirmed=confirmed)


@pytest.fixture
def synthetic() -> SyntheticFeed:
    return SyntheticFeed(seed=5, start=T0, end=T0 + timedelta(days=20), clock=T0 + timedelta(days=12, minutes=3))


@pytest.fixture
def btc(synthetic: SyntheticFeed) -> Instrument:
    return {i.inst_id: i for i in instruments_sync(feed=synthetic, enable=[BTC])}[BTC]


def _upsert_is_idempotent_and_keeps_closed_bars_closed(inst: Instrument) -> None:
    bars = [bar(15 * i, str(100 + i)) for i in range(10)] + [bar(150, "200", confirmed=False)]
    assert candles_upsert(instrument=inst, timeframe="15m", bars=bars) == 11
    assert candles_upsert(instrument=inst, timeframe="15m", bars=bars) == 11
    assert Candle.objects.filter(instrument=inst, timeframe="15m").count() == 11
    # The forming bar closes: the confirmed row replaces it.
    candles_upsert(instrument=inst, timeframe="15m", bars=[bar(150, "201")])
    closed = Candle.objects.get(instrument=inst, timeframe="15m", ts=T0 + timedelta(minutes=150))
    assert closed.confirmed and closed.close == Decimal("201")
    # A late unconfirmed copy never reopens it.
    assert candles_upsert(instrument=inst, timeframe="15m", bars=[bar(150, "999", confirmed=False)]) == 0
    closed.refresh_from_db()
    assert closed.confirmed and closed.close == Decimal("201")
    assert Candle.objects.filter(instrument=inst).count() == 11


@pytest.mark.django_db
def test_candle_upsert_is_idempotent_on_sqlite(btc: Instrument) -> None:
    _upsert_is_idempotent_and_keeps_closed_bars_closed(btc)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_candle_upsert_is_idempotent_on_postgresql(btc: Instrument) -> None:
    _upsert_is_idempotent_and_keeps_closed_bars_closed(btc)


@pytest.mark.django_db
def test_instruments_sync_updates_specs_and_enables_only_what_is_asked(synthetic: SyntheticFeed) -> None:
    rows = instruments_sync(feed=synthetic, enable=[BTC])
    assert {r.inst_id for r in rows} == {BTC, ETH}
    Instrument.objects.filter(inst_id=BTC).update(lot_sz=Decimal("1"))
    instruments_sync(feed=synthetic)
    btc = Instrument.objects.get(inst_id=BTC)
    assert btc.lot_sz == Decimal("0.01") and btc.trading_enabled
    assert not Instrument.objects.get(inst_id=ETH).trading_enabled
    with pytest.raises(ValueError, match="SOL-USDT-SWAP"):
        instruments_sync(feed=synthetic, enable=["SOL-USDT-SWAP"])


@pytest.mark.django_db
def test_synthetic_backfill_is_idempotent_and_resumes_as_the_clock_moves(synthetic: SyntheticFeed, btc: Instrument) -> None:
    seen: list[int] = []
    added = candles_backfill(feed=synthetic, instrument=btc, timeframe="1H", limit=100, progress=seen.append)
    assert 100 <= added <= 101 and sum(seen) == added
    assert candles_backfill(feed=synthetic, instrument=btc, timeframe="1H", limit=100) == 0
    synthetic.set_clock(synthetic.now() + timedelta(hours=5))
    assert candles_backfill(feed=synthetic, instrument=btc, timeframe="1H", limit=100) == 5
    # Asking for an older start continues below what is stored.
    more = candles_backfill(feed=synthetic, instrument=btc, timeframe="1H", since=T0 + timedelta(days=2))
    frame = candles_frame(instrument=btc, timeframe="1H", limit=10_000)
    assert frame.index[0] == T0 + timedelta(days=2) and more > 0
    assert frame.index.is_monotonic_increasing and (frame.index.to_series().diff().dropna() == timedelta(hours=1)).all()
    expected = synthetic.frame(BTC, "1H", limit=len(frame))
    assert (frame["close"].to_numpy() == expected["close"].to_numpy()).all()


@pytest.mark.django_db
def test_csv_backfill_through_the_command_is_idempotent(shared_data: Path) -> None:
    path = shared_data / "okx_BTC-USDT-SWAP_4H.csv"
    call_command("backfill", "--inst", BTC, "--tf", "4H", "1D", "--csv", str(path), "--since", "2025-01-01",
                 "--no-progress", stdout=open("/dev/null", "w"))
    first = Candle.objects.count()
    call_command("backfill", "--inst", BTC, "--tf", "4H", "1D", "--csv", str(path), "--since", "2025-01-01",
                 "--no-progress", stdout=open("/dev/null", "w"))
    assert Candle.objects.count() == first
    inst = Instrument.objects.get(inst_id=BTC)
    h4 = candles_frame(instrument=inst, timeframe="4H", limit=100_000)
    assert h4.index[0] == datetime(2025, 1, 1, tzinfo=UTC) and h4.index[-1] == datetime(2026, 4, 18, tzinfo=UTC)
    assert len(h4) == (h4.index[-1] - h4.index[0]) / timedelta(hours=4) + 1
    daily = candles_frame(instrument=inst, timeframe="1D", limit=100_000)
    assert len(daily) == len(h4) // 6  # built from 4H; the last, unfinished day is not a bar


@pytest.mark.django_db
@pytest.mark.parametrize("argv, message", [
    (["--inst", BTC, "--source", "csv"], "--csv"),
    (["--inst", BTC, "--since", "yesterday"], "ISO date"),
    (["--inst", BTC, "--limit", "0", "--source", "synthetic"], "positive"),
    (["--inst", "DOGE-USDT-SWAP", "--source", "synthetic", "--limit", "5"], "does not offer DOGE-USDT-SWAP"),
])
def test_the_command_rejects_bad_arguments_clearly(argv: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("backfill", *argv, "--no-progress")


# --- OKX through the fake server ----------------------------------------------
@pytest.fixture
def okx(okx_samples: Path) -> Iterator[OkxMarketFake]:
    with FakeHttpServer() as server:
        fake = OkxMarketFake(server)
        fake.sample(INSTRUMENTS, okx_samples / "public_instruments_SWAP.nautilus_fixture.json")
        yield fake


@pytest.mark.django_db
def test_okx_backfill_resumes_after_a_failure_and_stores_nothing_twice(okx: OkxMarketFake, settings) -> None:
    settings.OKX_MAX_RETRIES = 0
    start_ms = int((datetime.now(UTC) - timedelta(minutes=15 * 700)).timestamp() * 1000) // 900_000 * 900_000
    rows = candle_rows(start_ms=start_ms, count=700, step_ms=900_000)
    okx.candle_store(rows)
    feed = OkxFeed(base_url=okx.url, timeout=2.0)
    inst = {i.inst_id: i for i in instruments_sync(feed=feed)}[BTC]
    assert inst.lot_sz == Decimal("0.01")
    since = datetime.fromtimestamp(start_ms / 1000, tz=UTC)

    # The third page fails (HTTP 503): what was written so far stays, contiguous.
    served = {"n": 0}
    pager = OkxMarketFake._pager(rows, cap=300)

    def flaky(req):  # noqa: ANN001, ANN202
        served["n"] += 1
        return Reply(503, "<html>busy</html>") if served["n"] == 3 else pager(req)

    okx.server.route("GET", CANDLES, flaky)
    with pytest.raises(FeedTemporaryError):
        candles_backfill(feed=feed, instrument=inst, timeframe="15m", since=since)
    partial = Candle.objects.filter(instrument=inst, timeframe="15m").count()
    assert partial == 599  # two pages of 300, minus the forming (unconfirmed) bar

    okx.candle_store(rows)
    added = candles_backfill(feed=feed, instrument=inst, timeframe="15m", since=since)
    assert added == 100
    assert candles_backfill(feed=feed, instrument=inst, timeframe="15m", since=since) == 0
    stored = Candle.objects.filter(instrument=inst, timeframe="15m")
    assert stored.count() == 699 and not stored.filter(confirmed=False).exists()
    assert okx.calls(CANDLES)[0].headers["x-simulated-trading"] == "1"


@pytest.mark.django_db
def test_candles_sync_stores_the_forming_bar_flagged(okx: OkxMarketFake) -> None:
    start_ms = 1_740_787_200_000
    okx.candle_store(candle_rows(start_ms=start_ms, count=20, step_ms=3_600_000))
    feed = OkxFeed(base_url=okx.url, timeout=2.0)
    inst = {i.inst_id: i for i in instruments_sync(feed=feed)}[BTC]
    assert candles_sync(feed=feed, instrument=inst, timeframes=["1H"], limit=10) == 10
    assert Candle.objects.filter(instrument=inst, confirmed=False).count() == 1
    frame = candles_frame(instrument=inst, timeframe="1H")
    assert len(frame) == 9  # the forming bar is stored but never part of a frame


def _sync_writes_every_timeframe_in_one_statement_and_never_reopens_a_closed_bar(okx: OkxMarketFake) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    start_ms = 1_740_787_200_000
    steps = {"15m": 900_000, "1H": 3_600_000, "4H": 14_400_000}
    okx.candles_by_bar({tf: candle_rows(start_ms=start_ms, count=12, step_ms=step) for tf, step in steps.items()})
    feed = OkxFeed(base_url=okx.url, timeout=2.0)
    inst = {i.inst_id: i for i in instruments_sync(feed=feed)}[BTC]
    # Another writer already stored the 1H bar OKX still calls forming as closed: the sync must not reopen it.
    forming_1h = datetime.fromtimestamp((start_ms + 11 * steps["1H"]) / 1000, tz=UTC)
    closed = Bar(ts=forming_1h, open=Decimal("42"), high=Decimal("42"), low=Decimal("42"), close=Decimal("42"),
                 volume=Decimal("1"), confirmed=True)
    candles_upsert(instrument=inst, timeframe="1H", bars=[closed])
    with CaptureQueriesContext(connection) as queries:
        written = candles_sync(feed=feed, instrument=inst, timeframes=list(steps), limit=10)
    # One INSERT ... ON CONFLICT for the three timeframes: no read first, no BEGIN/COMMIT around it.
    assert [q["sql"].split()[0] for q in queries] == ["INSERT"], [q["sql"][:80] for q in queries]
    assert written == 29  # 3 x 10 bars, less the 1H bar kept closed
    row = Candle.objects.get(instrument=inst, timeframe="1H", ts=forming_1h)
    assert row.confirmed and row.close == Decimal("42")
    forming = Candle.objects.filter(instrument=inst, confirmed=False).order_by("timeframe")
    assert [c.timeframe for c in forming] == ["15m", "4H"]
    counts = {tf: Candle.objects.filter(instrument=inst, timeframe=tf).count() for tf in steps}
    assert counts == {"15m": 10, "1H": 10, "4H": 10}
    # Run again: every bar is written again (prices may move), the closed one still is not reopened.
    assert candles_sync(feed=feed, instrument=inst, timeframes=list(steps), limit=10) == 29
    row.refresh_from_db()
    assert row.confirmed and row.close == Decimal("42")


@pytest.mark.django_db
def test_candles_sync_writes_every_timeframe_in_one_statement_on_sqlite(okx: OkxMarketFake) -> None:
    _sync_writes_every_timeframe_in_one_statement_and_never_reopens_a_closed_bar(okx)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_candles_sync_writes_every_timeframe_in_one_statement_on_postgresql(okx: OkxMarketFake) -> None:
    _sync_writes_every_timeframe_in_one_statement_and_never_reopens_a_closed_bar(okx)


# --- reads ------------------------------------------------------------------
@pytest.mark.django_db
def test_candles_frame_only_holds_bars_closed_by_until(btc: Instrument) -> None:
    candles_upsert(instrument=btc, timeframe="1H", bars=[bar(60 * i, str(100 + i)) for i in range(6)])
    frame = candles_frame(instrument=btc, timeframe="1H", until=T0 + timedelta(hours=4, minutes=30))
    assert list(frame.columns) == ["open", "high", "low", "close", "volume"] and frame.index.name == "ts"
    assert str(frame.index.tz) == "UTC" and frame["close"].dtype == float
    assert frame.index[-1] == T0 + timedelta(hours=3) and frame["close"].iloc[-1] == 103.0


@pytest.mark.django_db
def test_returns_1h_are_aligned_across_instruments(synthetic: SyntheticFeed) -> None:
    instruments_sync(feed=synthetic)
    insts = {i.inst_id: i for i in Instrument.objects.all()}
    candles_backfill(feed=synthetic, instrument=insts[BTC], timeframe="1H", limit=50)
    candles_backfill(feed=synthetic, instrument=insts[ETH], timeframe="15m", limit=200)
    out = returns_1h(inst_ids=[BTC, ETH, "SOL-USDT-SWAP"], until=synthetic.now(), hours=24)
    assert len(out[BTC]) == len(out[ETH]) == 23 and out["SOL-USDT-SWAP"] == []
    closes = synthetic.frame(BTC, "1H", limit=24)["close"].to_numpy()
    assert out[BTC] == pytest.approx(list(closes[1:] / closes[:-1] - 1))
    # Replaying from the database gives the bars back.
    replay = ReplayFeed.from_db(inst_ids=[BTC], timeframes=["1H"], clock=synthetic.now())
    assert replay.candles(BTC, "1H", limit=5) == synthetic.candles(BTC, "1H", limit=5)
