"""`manage.py stream_okx`'s app against a local server speaking OKX's WebSocket protocol, fed with OKX's push samples.

The samples (../shared/data/okx_api/ws_*) are OKX's documented pushes and recorded ones; a sample
recorded for another instrument is re-addressed to BTC-USDT-SWAP (its `arg`/`instId`), the
fields of its `data` row kept as recorded unless a test says which one it changes and why.
"""
from __future__ import annotations

import copy
import io
import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from django.core.management import call_command

from journal.models import Cycle, CycleState, JournalEvent
from market.feeds.okx import OkxFeed
from market.models import Candle, LiveMarket, StreamStatus
from market.selectors import streams_health
from market.services import candles_upsert
from market.feeds.base import Bar
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_market import OkxMarketFake, candle_rows, okx_rows_from_csv
from tests.fakes.okx_ws_server import BUSINESS, PRIVATE, PUBLIC, FakeOkxWs
from tests.tradebot.stream_harness import BTC, RunningStream, btc_instrument, wait_for
from tradebot.celery import app as celery_app
from tradebot.streams import StreamApp

pytestmark = pytest.mark.django_db(transaction=True)

KEY, SECRET, PASSPHRASE = "ws-test-key-7f3a9c21", "ws-test-secret-0d9e8b7a6c5f", "ws-test-pass-4411"


@pytest.fixture
def ws():  # noqa: ANN201
    with FakeOkxWs(api_key=KEY, secret=SECRET, passphrase=PASSPHRASE) as server:
        yield server


@pytest.fixture(autouse=True)
def fast_streams(settings):  # noqa: ANN001, ANN201
    settings.STREAM_FLUSH_SECONDS = 0.05
    settings.STREAM_BACKOFF_FIRST_SECONDS = 0.05
    settings.STREAM_BACKOFF_MAX_SECONDS = 0.2
    settings.ANOMALY_MOVE_1H_PCT = Decimal("0.03")


@pytest.fixture
def memory_broker():  # noqa: ANN201
    """Tasks the stream sends (a cycle's chain, an account sync) go to an in-memory broker: nothing runs them."""
    conf = celery_app.conf
    before = (conf.broker_url, conf.broker_transport)
    conf.broker_url, conf.broker_transport = "memory://", None
    celery_app._pool = None  # noqa: SLF001
    celery_app.amqp._producer_pool = None  # noqa: SLF001
    yield
    conf.broker_url, conf.broker_transport = before
    celery_app._pool = None  # noqa: SLF001
    celery_app.amqp._producer_pool = None  # noqa: SLF001


def sample(okx_samples: Path, name: str) -> dict:
    return json.loads((okx_samples / name).read_text())


def readdressed(body: dict, channel: str, inst_id: str = BTC) -> tuple[dict, list]:
    data = copy.deepcopy(body["data"])
    for row in data:
        if isinstance(row, dict) and "instId" in row:
            row["instId"] = inst_id
    return {"channel": channel, "instId": inst_id}, data


def public_app(ws: FakeOkxWs, **kw) -> StreamApp:  # noqa: ANN003
    return StreamApp(inst_ids=[BTC], ws_base=ws.url, credentials=None, flush_seconds=0.05, **kw)


def test_closed_candles_pushed_arrive_in_the_store_and_an_unconfirmed_one_does_not(ws, okx_samples, shared_data) -> None:
    inst = btc_instrument()
    # Closed bars: the recorded OKX BTC-USDT-SWAP 15m bars of 2026-04-18 00:00-00:30, as OKX pushes them (confirm "1").
    until = int(datetime(2026, 4, 18, 0, 45, tzinfo=UTC).timestamp() * 1000)
    closed = okx_rows_from_csv(shared_data / "okx_BTC-USDT-SWAP_15m.csv.gz", timeframe="15m", until_ms=until)[:3]
    assert all(r[8] == "1" for r in closed)
    forming = sample(okx_samples, "ws_candle.okxdoc_push.json")["data"][0]  # OKX's documented push: confirm "0"
    assert forming[8] == "0"
    with RunningStream(public_app(ws)) as running:
        ws.wait_subscribed(BUSINESS, "candle15m", BTC)
        for row in reversed(closed):
            ws.push(BUSINESS, {"channel": "candle15m", "instId": BTC}, [row])
        ws.push(BUSINESS, {"channel": "candle15m", "instId": BTC}, [forming])
        wait_for(lambda: Candle.objects.filter(instrument=inst).count() >= 3, what="closed candles stored")
        time.sleep(0.2)  # a flush or two more: the forming bar would be written by now
        assert running.public.counts["candles_forming"] == 1
    stored = {c.ts: c for c in Candle.objects.filter(instrument=inst, timeframe="15m")}
    assert len(stored) == 3
    for row in closed:
        bar = stored[datetime.fromtimestamp(int(row[0]) / 1000, tz=UTC)]
        assert (bar.open, bar.high, bar.low, bar.close, bar.volume) == tuple(Decimal(v) for v in (*row[1:5], row[6]))
        assert bar.confirmed
    assert datetime.fromtimestamp(int(forming[0]) / 1000, tz=UTC) not in stored


def _hour_of_bars(inst, *, price: str, now: datetime) -> None:  # noqa: ANN001
    """Closed 15m bars for the last two hours at `price` (the 1H reference the trigger measures from)."""
    start = now.replace(minute=now.minute - now.minute % 15, second=0, microsecond=0) - timedelta(hours=2)
    p = Decimal(price)
    bars = [Bar(ts=start + timedelta(minutes=15 * i), open=p, high=p, low=p, close=p, volume=Decimal("1"))
            for i in range(8)]
    candles_upsert(instrument=inst, timeframe="15m", bars=bars)


def test_a_5pct_move_pushed_on_the_ticker_starts_a_cycle_for_that_instrument_once(ws, okx_samples, memory_broker) -> None:
    inst = btc_instrument()
    base = sample(okx_samples, "ws_tickers.capture_cryptofeed_UNI-USD-SWAP_20220513.json")  # recorded SWAP ticker
    _hour_of_bars(inst, price=base["data"][0]["last"], now=datetime.now(UTC))
    ref = Decimal(base["data"][0]["last"])
    arg, data = readdressed(base, "tickers")

    def tick(last: Decimal) -> None:
        data[0]["last"] = str(last)  # the one field changed: the price
        data[0]["ts"] = str(int(time.time() * 1000))
        ws.push(PUBLIC, arg, data)

    with RunningStream(public_app(ws)) as running:
        ws.wait_subscribed(PUBLIC, "tickers", BTC)
        tick(ref * Decimal("1.01"))  # 1%: inside the 3% bypass
        tick(ref * Decimal("1.05"))  # 5%: crosses it
        for step in ("1.051", "1.06", "1.052", "1.05"):  # stays beyond it: no more cycles
            tick(ref * Decimal(step))
        wait_for(lambda: running.public.counts["tickers"] == 6, what="six ticks handled")
        # The event follows the cycle's row once its chain is sent (the first send loads the broker's code).
        wait_for(lambda: JournalEvent.objects.filter(kind="stream_trigger").exists(), what="a cycle")
        time.sleep(0.3)
        cycles = list(Cycle.objects.filter(instrument=inst))
        assert len(cycles) == 1, [(c.state, c.reason) for c in cycles]
        assert cycles[0].stage_times["trigger"] == "stream" and cycles[0].state == CycleState.IDLE
        event = JournalEvent.objects.get(kind="stream_trigger")
        assert "1H move +5.00%" in event.message and event.cycle_id == cycles[0].pk
        # Back inside, then out again: the trigger fires again, and the rule of one cycle per instrument
        # (the first still runs) records a skip instead of a second cycle.
        tick(ref * Decimal("1.02"))
        tick(ref * Decimal("0.96"))
        wait_for(lambda: Cycle.objects.filter(instrument=inst).count() == 2, what="the second trigger")
    second = Cycle.objects.filter(instrument=inst).order_by("-id").first()
    assert second.state == CycleState.SKIPPED and f"previous cycle {cycles[0].pk}" in second.reason


def test_a_server_drop_reconnects_resubscribes_and_missed_candles_come_from_rest(ws, settings) -> None:
    inst = btc_instrument()
    settings.TIMEFRAMES = ["15m"]
    now_ms = int(time.time() * 1000)
    step = 900_000
    last_open = now_ms - now_ms % step - step  # the bar that closed last
    rows = candle_rows(start_ms=last_open - 29 * step, count=31, step_ms=step)  # 30 closed + the forming one
    missed = rows[1:3]  # the two newest closed bars: OKX had them only after the drop
    with FakeHttpServer() as http:
        market = OkxMarketFake(http)
        market.candles_by_bar({"15m": rows[:1] + rows[3:]})  # before the drop: the two newest closed bars missing
        feed = OkxFeed(base_url=http.url, flag="1")
        app = public_app(ws, rest_feed=feed, gap_fill_limit=20)
        with RunningStream(app) as running:
            ws.wait_subscribed(BUSINESS, "candle15m", BTC)
            wait_for(lambda: running.gap_fills == 1, what="the first gap fill")
            stored = set(Candle.objects.filter(instrument=inst).values_list("ts", flat=True))
            assert not {datetime.fromtimestamp(int(r[0]) / 1000, tz=UTC) for r in missed} & stored
            market.candles_by_bar({"15m": rows})  # meanwhile OKX closed them
            assert ws.drop(BUSINESS) == 1
            wait_for(lambda: ws.connections[BUSINESS] == 2 and ws.subscribed(BUSINESS, "candle15m", BTC),
                     what="reconnected and resubscribed")
            wait_for(lambda: running.gap_fills == 2, what="the gap fill after the reconnect")
            running.flush()
            assert running.streams["business"].state.reconnects == 1
        feed.close()
    stored = set(Candle.objects.filter(instrument=inst, confirmed=True).values_list("ts", flat=True))
    assert {datetime.fromtimestamp(int(r[0]) / 1000, tz=UTC) for r in missed} <= stored
    subscribes = [json.loads(t) for p, t in ws.received if p == BUSINESS and t != "ping"]
    assert [m["op"] for m in subscribes] == ["subscribe", "subscribe"]  # once per connection
    status = StreamStatus.objects.get(name="business")
    assert status.reconnects == 1 and not status.connected  # written at the stop


def test_a_refused_login_stops_the_private_stream_with_one_clear_error(ws, memory_broker) -> None:
    btc_instrument()
    wrong = StreamApp(inst_ids=[BTC], ws_base=ws.url, flush_seconds=0.05,
                      credentials=__import__("market.streams.okx_ws", fromlist=["Credentials"]).Credentials(
                          api_key=KEY, secret="not-the-secret-123456", passphrase=PASSPHRASE))
    with RunningStream(wrong) as running:
        wait_for(lambda: running.streams["private"].state.stopped, what="the private stream stopped")
        time.sleep(0.6)  # a reconnect loop would have logged in again by now (backoff 0.05 s)
        ws.wait_subscribed(PUBLIC, "tickers", BTC)  # the public side goes on
        assert running.streams["public"].state.connected
        running.flush()
        health = wait_for(streams_health, what="the health read")  # what `bot status` and the health check show
        assert health["running"] and not health["ok"]
        assert health["streams"]["public"] == "up" and health["streams"]["business"] == "up"
        assert health["streams"]["private"].startswith("private: stopped: OKX refused the WebSocket login (code 60009)")
    assert ws.logins == [(PRIVATE, False)]  # one attempt; the algo connection never tried
    events = list(JournalEvent.objects.filter(kind="stream_login_refused"))
    assert len(events) == 1
    assert "60009" in events[0].message and "OKX_API_KEY" in events[0].message
    assert "Login failed." in events[0].data["raw"]
    status = StreamStatus.objects.get(name="private")
    assert status.stopped and "refused" in status.error
    out = io.StringIO()
    call_command("bot", "status", stdout=out)
    line = next(x for x in out.getvalue().splitlines() if x.startswith("streams"))
    assert "private: stopped: OKX refused" in line and "public: stopped: manage.py stream_okx stopped" in line
    for text in JournalEvent.objects.values_list("message", "data"):
        assert "not-the-secret" not in str(text) and PASSPHRASE not in str(text)


def test_malformed_pushes_error_events_and_unknown_messages_are_journaled_and_ignored(ws, okx_samples) -> None:
    btc_instrument()
    ticker = sample(okx_samples, "ws_tickers.capture_cryptofeed_UNI-USD-SWAP_20220513.json")
    arg, data = readdressed(ticker, "tickers")
    bad = copy.deepcopy(data)
    bad[0]["last"] = "abc"
    error_reply = (okx_samples / "ws_candle.okxdoc_subscribe_error.json").read_text()  # OKX's documented error event
    with RunningStream(public_app(ws)) as running:
        ws.wait_subscribed(PUBLIC, "tickers", BTC)
        ws.push_raw(PUBLIC, '{"arg": {"channel": "tickers", "instId": "BTC-USDT-SWAP"}, "data": [')  # cut short
        ws.push(PUBLIC, arg, bad)
        ws.push_raw(PUBLIC, error_reply)
        ws.push_raw(PUBLIC, json.dumps({"event": "mystery", "arg": {}}))
        ws.push(PUBLIC, {"channel": "books5", "instId": BTC}, [{"asks": "none", "bids": [], "ts": "1"}])
        ws.push(PUBLIC, arg, data)  # and a good one after all that
        wait_for(lambda: LiveMarket.objects.filter(instrument__inst_id=BTC, last__isnull=False).exists(),
                 what="the good ticker stored")
        wait_for(lambda: JournalEvent.objects.count() >= 5, what="five journal events")
        assert running.streams["public"].state.connected and running.streams["public"].state.reconnects == 0
    live = LiveMarket.objects.get(instrument__inst_id=BTC)
    assert live.last == Decimal(data[0]["last"]) and live.bid == Decimal(data[0]["bidPx"])
    kinds = sorted(JournalEvent.objects.values_list("kind", flat=True))
    assert kinds == ["stream_bad_push", "stream_bad_push", "stream_error_event", "stream_malformed",
                     "stream_unknown_message"]
    bad_push = JournalEvent.objects.filter(kind="stream_bad_push", message__contains="last").get()
    assert "'abc'" in bad_push.message and '"last": "abc"' in bad_push.data["raw"]
    assert "60012" in JournalEvent.objects.get(kind="stream_error_event").message


def test_live_ticker_book_funding_and_open_interest_are_kept_where_the_snapshot_reads_them(ws, okx_samples) -> None:
    from market.streams.store_feed import stream_feed_for

    inst = btc_instrument()
    t_arg, t_data = readdressed(sample(okx_samples, "ws_tickers.capture_cryptofeed_UNI-USD-SWAP_20220513.json"), "tickers")
    b_arg, b_data = readdressed(sample(okx_samples, "ws_books5.okxdoc_push.json"), "books5")
    f_arg, f_data = readdressed(sample(okx_samples, "ws_funding-rate.okxdoc_push.json"), "funding-rate")
    o_body = sample(okx_samples, "public_open-interest.okxdoc.json")  # OKX pushes the REST row's fields on the channel
    now_ms = str(int(time.time() * 1000))
    for rows in (t_data, b_data, f_data, o_body["data"]):
        rows[0]["ts"] = now_ms  # pushed now (the samples' own times are years old: the freshness rule would refuse them)
    with RunningStream(public_app(ws)) as running:
        for channel in ("tickers", "books5", "funding-rate", "open-interest"):
            ws.wait_subscribed(PUBLIC, channel, BTC)
        ws.push(PUBLIC, t_arg, t_data)
        ws.push(PUBLIC, b_arg, b_data)
        ws.push(PUBLIC, f_arg, f_data)
        ws.push(PUBLIC, {"channel": "open-interest", "instId": BTC}, o_body["data"])
        wait_for(lambda: LiveMarket.objects.filter(instrument=inst, oi__isnull=False, book__isnull=False,
                                                   funding_rate__isnull=False, last__isnull=False).exists(),
                 what="all four parts stored")
        running.flush()
        feed = stream_feed_for(rest=None, instrument=inst, as_of=datetime.now(UTC))
        assert {k: v for k, v in feed.sources.items() if k != "candles"} == {
            "ticker": "stream", "book": "stream", "funding": "stream", "open_interest": "stream"}
        assert feed.sources["candles"].startswith("rest (")  # the store has no candles: REST says so
        assert feed.ticker(BTC).last == Decimal(t_data[0]["last"])
        book = feed.order_book(BTC, 5)
        assert book.bids[0].price == Decimal("111.05") and book.asks[0].size == Decimal("55154")
        assert feed.funding_rate(BTC).rate == Decimal("0.0001875391284828")
        assert feed.open_interest(BTC).oi_contracts == Decimal("5000")


def test_a_stream_trigger_opens_its_cycle_in_the_bots_mode(settings, memory_broker) -> None:
    """`make demo`'s stream (BOT_MODE=demo) must not open LIVE cycles that trade the live paper account."""
    from journal.models import Mode
    from tradebot.streams import stream_cycle_start

    inst = btc_instrument()
    settings.BOT_MODE = Mode.DEMO
    cycle_id = stream_cycle_start(inst_id=inst.inst_id, reason="1H move +5.00%")
    assert Cycle.objects.get(pk=cycle_id).mode == Mode.DEMO


def test_private_pushes_ask_for_a_sync_and_a_reconnect_logs_in_again_resubscribes_and_asks_for_a_fresh_one(
        ws, okx_samples, memory_broker) -> None:
    """Fills (see test_stream_okx_workers), position changes and triggered algo orders each ask for an account sync;
    after a drop each private connection logs in again, subscribes again and asks for one (what it missed)."""
    from market.streams.okx_ws import Credentials

    btc_instrument()
    positions = sample(okx_samples, "ws_positions.okxdoc_push_single.json")  # OKX's documented snapshot push
    algo = sample(okx_samples, "ws_orders-algo.okxdoc_push.json")  # OKX's documented push: state "live"
    assert algo["data"][0]["state"] == "live"
    app = StreamApp(inst_ids=[BTC], ws_base=ws.url, flush_seconds=0.05,
                    credentials=Credentials(api_key=KEY, secret=SECRET, passphrase=PASSPHRASE))
    with RunningStream(app) as running:
        ws.wait_subscribed(PRIVATE, "positions")
        ws.wait_subscribed(BUSINESS, "orders-algo")
        private = running.private
        wait_for(lambda: private.requested == 1, what="the connect's sync")
        pos_key = ("positions", "")
        ws.push_raw(PRIVATE, json.dumps(positions), key=pos_key)  # the state after the connect: no sync
        wait_for(lambda: private.positions is not None, what="the positions snapshot read")
        changed = copy.deepcopy(positions)
        changed["data"][0]["pos"] = "3"  # the one field changed: the position grew
        ws.push_raw(PRIVATE, json.dumps(changed), key=pos_key)
        wait_for(lambda: private.requested == 2, what="a sync for the changed position")
        ws.push_raw(BUSINESS, json.dumps(algo), key=("orders-algo", ""))  # placed, not triggered: no sync
        triggered = copy.deepcopy(algo)
        triggered["data"][0]["state"] = "effective"  # the one field changed: the stop triggered
        ws.push_raw(BUSINESS, json.dumps(triggered), key=("orders-algo", ""))
        wait_for(lambda: private.requested == 3, what="a sync for the triggered algo order")
        time.sleep(0.6)  # past the coalescing interval: nothing else was asked for
        assert private.requested == 3
        assert ws.logins == [(PRIVATE, True), (BUSINESS, True)]

        ws.drop(PRIVATE)
        wait_for(lambda: ws.connections[PRIVATE] == 2 and ws.subscribed(PRIVATE, "orders")
                 and ws.subscribed(PRIVATE, "positions") and ws.subscribed(PRIVATE, "account"),
                 what="the private connection back, logged in and subscribed")
        wait_for(lambda: private.requested == 4, what="a fresh sync after the private reconnect")
        ws.drop(BUSINESS)
        wait_for(lambda: ws.subscribed(BUSINESS, "orders-algo"), what="the algo connection back and subscribed")
        wait_for(lambda: private.requested == 5, what="a fresh sync after the algo reconnect")
        assert running.streams["private"].state.reconnects == 1 and running.streams["algo"].state.reconnects == 1
    assert ws.logins == [(PRIVATE, True), (BUSINESS, True), (PRIVATE, True), (BUSINESS, True)]


def test_a_price_crossing_the_position_watchs_trigger_starts_a_cycle_while_the_position_is_open(
        ws, okx_samples, memory_broker, monkeypatch) -> None:
    import tradebot.streams as streams
    from journal.models import Trade, TradeStatus
    from tests.brain.factories import snapshot

    monkeypatch.setattr(streams, "POSITIONS_EVERY", 0.1)
    inst = btc_instrument()
    now = datetime.now(UTC)
    # The analyst's last review: price 70000, 1H ATR 420 (the factory's 0.6%); the trade it opened.
    seen = snapshot(price=70000.0, ts=now - timedelta(minutes=5))
    reviewed = Cycle.objects.create(instrument=inst, as_of=seen.ts, state=CycleState.DONE,
                                    snapshot=seen.as_jsonable(), decision={"decision": {"action": "OPEN_LONG"}})
    trade = Trade.objects.create(instrument=inst, cycle=reviewed, opened_at=seen.ts, direction="LONG",
                                 entry_price=Decimal("70010"), stop_loss=Decimal("68900"), take_profit=Decimal("72000"),
                                 size=Decimal("1"))
    arg, data = readdressed(sample(okx_samples, "ws_tickers.capture_cryptofeed_UNI-USD-SWAP_20220513.json"), "tickers")

    def tick(last: str) -> None:
        data[0]["last"], data[0]["ts"] = last, str(int(time.time() * 1000))  # the fields changed: price and time
        ws.push(PUBLIC, arg, data)

    with RunningStream(public_app(ws)) as running:
        ws.wait_subscribed(PUBLIC, "tickers", BTC)
        wait_for(lambda: running.public.watches[BTC].position is not None, what="the position's levels read")
        tick("70200")  # 0.48 ATR from the review: nothing
        tick("70500")  # 1.19 ATR (0.7%, far below the 3% 1H bypass): the position watch fires
        tick("70520")
        event = wait_for(lambda: JournalEvent.objects.filter(kind="stream_trigger").first(), what="the triggered cycle")
        assert "position watch: price moved 1.19 ATR since the last review (70000 -> 70500)" in event.message
        Trade.objects.filter(pk=trade.pk).update(status=TradeStatus.CLOSED)
        wait_for(lambda: running.public.watches[BTC].position is None, what="the closed position's levels dropped")
        tick("70000")
        tick("70600")  # the same move with nothing open: no cycle
        wait_for(lambda: running.public.counts["tickers"] == 5, what="five ticks handled")
        time.sleep(0.2)
    assert Cycle.objects.filter(instrument=inst).count() == 2
    assert Cycle.objects.filter(instrument=inst).latest("id").stage_times["trigger"] == "stream"
