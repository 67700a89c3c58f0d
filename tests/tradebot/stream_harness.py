"""Run `tradebot.streams.StreamApp` in a thread (its own event loop) against the local OKX WebSocket server."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from market.models import Instrument
from tradebot.streams import StreamApp

BTC = "BTC-USDT-SWAP"


def btc_instrument() -> Instrument:
    inst, _ = Instrument.objects.update_or_create(inst_id=BTC, defaults={
        "ct_val": Decimal("0.01"), "lot_sz": Decimal("0.01"), "min_sz": Decimal("0.01"), "tick_sz": Decimal("0.1"),
        "max_lever": Decimal("100"), "trading_enabled": True})
    return inst


def wait_for(check: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it is truthy. The tests' SQLite database is shared-cache in memory: a read while the
    stream's database thread writes that table is refused at once ("table is locked"); the next poll reads it."""
    from django.db import OperationalError

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OperationalError as exc:
            if "locked" not in str(exc):
                raise
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)


class RunningStream:
    """`with RunningStream(app) as app:` the app runs until the block ends (then stops cleanly)."""

    def __init__(self, app: StreamApp) -> None:
        self.app = app
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="stream-app")

    def _main(self) -> None:
        try:
            asyncio.run(self.app.run())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    def __enter__(self) -> RunningStream:
        self._thread.start()
        wait_for(lambda: self.app._loop is not None and self.app.streams or self.error, what="stream app start")
        if self.error:
            raise self.error
        return self

    def __getattr__(self, name: str) -> Any:  # the app's attributes (streams, public, gap_fills, ...)
        return getattr(self.app, name)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the app's event loop and return its result (coroutines awaited)."""
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        assert self.app._loop is not None
        return asyncio.run_coroutine_threadsafe(run(), self.app._loop).result(30)

    def flush(self) -> None:
        self.call(self.app.flushed)

    def __exit__(self, *exc: object) -> None:
        loop = self.app._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.app.stop)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the stream app did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error
