"""A fill pushed on OKX's private stream closes the journaled trade within seconds, through a REAL orders-queue worker.

The stream process (StreamApp here) logs in to the local OKX WebSocket server, a recorded
BTC-USDT-SWAP fill is pushed on `orders`, the stream queues `tradebot.tasks.account_sync` on
the orders queue (Redis), and a real Celery worker, trading on the local OKX REST server with the
same keys, reconciles: the position is gone and positions-history has its close, so the Trade is
journaled CLOSED with OKX's numbers.
"""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from journal.models import Trade, TradeStatus
from tests.conftest import SHARED_DATA, missing_service, redis_url
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_trade_server import POSITIONS, OkxTradeFake, history_row
from tests.fakes.okx_ws_server import PRIVATE, FakeOkxWs
from tests.tradebot.stream_harness import BTC, RunningStream, btc_instrument, wait_for
from tests.tradebot.workers import Workers, redis_reachable
from market.streams.okx_ws import Credentials
from tradebot.streams import StreamApp

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
KEY, SECRET, PASSPHRASE = "ws-worker-key-55aa01", "ws-worker-secret-9b8c7d6e5f", "ws-worker-pass-77"
FILL_SAMPLE = SHARED_DATA / "okx_api" / "ws_orders.nautilus_fixture_push.json"


@pytest.fixture(scope="module")
def okx_rest():  # noqa: ANN201
    with FakeHttpServer() as server:
        yield OkxTradeFake(server), server


@pytest.fixture(scope="module")
def okx_worker(django_db_setup, django_db_blocker, tmp_path_factory, okx_rest):  # noqa: ANN001, ANN201
    url = redis_url()
    if not redis_reachable(url):
        missing_service(f"Redis is not reachable at {url}")
    _, server = okx_rest
    with django_db_blocker.unblock():
        w = Workers(redis_url=url, tmp=tmp_path_factory.mktemp("stream-workers"), extra_env={
            "OKX_API_KEY": KEY, "OKX_API_SECRET": SECRET, "OKX_PASSPHRASE": PASSPHRASE, "OKX_BASE_URL": server.url,
            "OKX_DEMO": "true", "OKX_MAX_RETRIES": "0", "MARKET_DATA_SOURCE": "synthetic"})
    w.start("orders")
    yield w
    w.stop_all()


def test_a_pushed_fill_queues_the_account_sync_and_the_trade_is_journaled_closed_within_5s(
        okx_worker, okx_rest, settings) -> None:  # noqa: ANN001
    if not FILL_SAMPLE.exists():
        pytest.skip(f"OKX push samples not found at {FILL_SAMPLE.parent} (../shared/data is only beside a checkout)")
    fake, server = okx_rest
    settings.STREAM_FLUSH_SECONDS = 0.05
    inst = btc_instrument()
    opened = datetime.now(UTC) - timedelta(hours=1)
    trade = Trade.objects.create(instrument=inst, opened_at=opened, direction="LONG", entry_price=Decimal("65000"),
                                 stop_loss=Decimal("64000"), take_profit=Decimal("67000"), size=Decimal("1"),
                                 leverage=Decimal("3"), strategy_used="test")
    opened_ms = int(opened.timestamp() * 1000)
    fake.positions = [{"instId": BTC, "posSide": "long", "pos": "1", "avgPx": "65000", "notionalUsd": "650",
                       "lever": "3", "upl": "1.5", "margin": "216.6", "cTime": str(opened_ms), "posId": "77001"}]
    fake.history = []
    with FakeOkxWs(api_key=KEY, secret=SECRET, passphrase=PASSPHRASE) as ws:
        app = StreamApp(inst_ids=[BTC], ws_base=ws.url, flush_seconds=0.05,
                        credentials=Credentials(api_key=KEY, secret=SECRET, passphrase=PASSPHRASE))
        with RunningStream(app) as running:
            ws.wait_subscribed(PRIVATE, "orders")
            # The connect's own sync runs first (the position is still open): wait for it to have read the positions.
            wait_for(lambda: server.calls("GET", POSITIONS), timeout=30, what="the connect's account sync")
            wait_for(lambda: running.private.requested >= 1, what="the connect's sync request")
            time.sleep(0.5)
            assert Trade.objects.get(pk=trade.pk).status == TradeStatus.OPEN
            # Now OKX closes the position (the stop triggered) and pushes the fill.
            closed_ms = int(time.time() * 1000) - 500
            fake.positions = []
            fake.history = [history_row(pos_id="77001", u_time_ms=closed_ms, c_time_ms=opened_ms + 1000, pnl="-10")]
            pushed = time.monotonic()
            assert ws.push_raw(PRIVATE, FILL_SAMPLE.read_text(), key=("orders", "")) == 1
            closed = wait_for(lambda: Trade.objects.filter(pk=trade.pk, status=TradeStatus.CLOSED).first(),
                              timeout=10, what=f"the trade closed\n{okx_worker.worker_logs()}")
            elapsed = time.monotonic() - pushed
    assert elapsed < 5.0, f"journaled closed {elapsed:.2f}s after the push"
    assert closed.exit_price == Decimal("65150") and closed.closed_at is not None
    assert running.private.requested == 2  # the connect's sync and the fill's
    print(f"pushed fill -> journaled close: {elapsed * 1000:.0f} ms")  # noqa: T201
    assert json.loads(FILL_SAMPLE.read_text())["data"][0]["state"] == "filled"
