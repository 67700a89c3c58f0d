"""`manage.py stream_okx`: keep OKX's WebSockets open and write what they push (see tradebot.streams)."""
from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = ("Keep OKX's public, business and (with keys) private WebSockets open: candles into the store, live "
            "tickers/books/funding/open interest, account syncs on fills, cycles on sharp moves. Ctrl-C stops.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--inst", default="", help="comma-separated instIds (default: the enabled instruments)")
        parser.add_argument("--ws-url", default=None, help="WebSocket host (default OKX_WS_URL, or OKX's demo/live host)")
        parser.add_argument("--no-private", action="store_true", help="public data only, even with OKX keys set")

    def handle(self, *args: Any, **opts: Any) -> None:
        from market.feeds import okx_feed_from_settings
        from tradebot.streams import StreamApp

        if settings.MARKET_DATA_SOURCE in ("synthetic", "replay"):
            raise CommandError(f"MARKET_DATA_SOURCE={settings.MARKET_DATA_SOURCE}: there is no OKX stream to keep "
                               "(stream_okx streams OKX's live market)")
        app = StreamApp(inst_ids=[i for i in opts["inst"].split(",") if i] or None, ws_base=opts["ws_url"],
                        credentials=None if opts["no_private"] else True, rest_feed=okx_feed_from_settings())
        private = "with private channels" if app.credentials is not None else "public channels only (no OKX keys)"
        self.stdout.write(f"stream_okx: {app.urls['public']} and {app.urls['business']}, {private}")

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, app.stop)
            await app.run()

        asyncio.run(main())
        for name, stream in app.streams.items():
            if stream.state.stopped:
                self.stderr.write(f"{name} stream stopped: {stream.state.error}")
        self.stdout.write("stream_okx stopped")
