"""One OKX WebSocket connection (market.streams.okx_ws.OkxStream) against the local server: OKX's ping/pong rule,
the reconnect backoff and its cap, the demo endpoint. No database: the handler here only counts."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest

from market.streams.okx_ws import OkxStream
from tests.fakes.okx_ws_server import PUBLIC, FakeOkxWs
from tests.tradebot.stream_harness import wait_for


class Counting:
    def __init__(self) -> None:
        self.pushes: list[str] = []
        self.connects: list[bool] = []

    def on_push(self, channel: str, arg: dict[str, Any], data: list[Any], message: dict[str, Any]) -> None:
        self.pushes.append(channel)

    def on_connected(self, *, stream: str, reconnect: bool) -> None:
        self.connects.append(reconnect)


class Running:
    """An OkxStream on an event loop of its own thread (as StreamApp runs it)."""

    def __init__(self, stream: OkxStream) -> None:
        self.stream = stream
        self.problems: list[dict[str, Any]] = []
        stream.on_problem = lambda **report: self.problems.append(report)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(stream.run(),), daemon=True)

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stream.stop)
        self.thread.join(10)
        assert not self.thread.is_alive()


def public_stream(url: str, handler: Counting, **kw: Any) -> OkxStream:
    return OkxStream(name="public", url=f"{url}{PUBLIC}", args=[{"channel": "tickers", "instId": "BTC-USDT-SWAP"}],
                     handler=handler, on_problem=lambda **r: None, **kw)


def test_a_quiet_connection_pings_and_one_whose_pong_never_comes_is_reopened() -> None:
    """OKX's rule: after N s (< 30) with nothing received send "ping"; no "pong" within N s means reconnect."""
    handler = Counting()
    with FakeOkxWs() as ws, Running(public_stream(ws.url, handler, ping_after=0.2, pong_timeout=0.3,
                                                  backoff_first=0.05, backoff_max=0.1)) as running:
        ws.wait_subscribed(PUBLIC, "tickers", "BTC-USDT-SWAP")
        wait_for(lambda: ws.pings >= 3, what="three pings on a quiet connection")
        assert ws.connections[PUBLIC] == 1 and running.stream.state.reconnects == 0, "answered pings keep it open"
        pings = [t for p, t in ws.received if t == "ping"]
        assert pings == ["ping"] * len(pings)  # the text frame "ping", as OKX wants it
        ws.answer_pings = False  # the connection is dead although TCP still says it is open
        wait_for(lambda: ws.connections[PUBLIC] == 2 and ws.subscribed(PUBLIC, "tickers", "BTC-USDT-SWAP"),
                 what="a new connection after the missing pong")
        assert running.stream.state.reconnects >= 1
        assert handler.connects[:2] == [False, True]


def test_the_reconnect_backoff_doubles_and_never_exceeds_its_cap() -> None:
    with socket.socket() as s:  # a port nothing listens on: every connect is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stream = public_stream(f"ws://127.0.0.1:{port}", Counting(), backoff_first=0.01, backoff_max=0.04)
    with Running(stream):
        wait_for(lambda: len(stream.delays) >= 12, what="twelve reconnect attempts")
    delays = stream.delays[:12]
    assert 0.008 <= delays[0] <= 0.012 and 0.016 <= delays[1] <= 0.024  # 0.01 s, then doubled (jitter +-20%)
    capped = delays[3:]
    assert all(0.032 <= d <= 0.04 for d in capped), delays  # at the cap, jitter included
    assert not stream.state.connected and stream.state.error.startswith(("OSError", "ConnectionRefusedError"))


def test_the_stream_process_reconnects_with_a_60s_cap_and_uses_the_demo_host_when_demo(settings) -> None:
    from tradebot.streams import StreamApp, stream_urls

    settings.OKX_WS_URL = ""
    settings.OKX_DEMO = True
    assert stream_urls() == {"public": "wss://wspap.okx.com:8443/ws/v5/public",
                             "business": "wss://wspap.okx.com:8443/ws/v5/business",
                             "private": "wss://wspap.okx.com:8443/ws/v5/private"}
    settings.OKX_DEMO = False
    assert stream_urls()["private"] == "wss://ws.okx.com:8443/ws/v5/private"
    assert settings.STREAM_BACKOFF_MAX_SECONDS == 60.0  # the default: what `make run` and compose run with
    app = StreamApp(inst_ids=["BTC-USDT-SWAP"], credentials=None)
    app.instruments = {}
    app.build()
    assert {s.backoff_max for s in app.streams.values()} == {60.0}
    assert {s.ping_after for s in app.streams.values()} == {25.0}  # under OKX's 30 s


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"event": "mystery"}', '{"arg": {}, "data": 5}'])
def test_what_the_server_sends_never_breaks_the_connection(text: str) -> None:
    handler = Counting()
    with FakeOkxWs() as ws, Running(public_stream(ws.url, handler)) as running:
        ws.wait_subscribed(PUBLIC, "tickers", "BTC-USDT-SWAP")
        ws.push_raw(PUBLIC, text)
        ws.push(PUBLIC, {"channel": "tickers", "instId": "BTC-USDT-SWAP"}, [{"last": "1"}])
        wait_for(lambda: handler.pushes == ["tickers"], what="the good push after the bad one")
        time.sleep(0.05)
        assert [p["raw"] for p in running.problems] == [text]
        assert running.stream.state.connected and ws.connections[PUBLIC] == 1
