"""The watchlist's wiring: the daily top-N selection with the live positions, and beat kept in step.

`market.watchlist` holds the rules; this module adds what only the top of the
stack may know: which instruments have a position open (never turned off
under it) and the beat entries, re-synced whenever the watchlist changes.
"""
from __future__ import annotations

from typing import Any

import structlog
from django.conf import settings

from market.watchlist import TopNReport, watchlist_changed, watchlist_top_n

log = structlog.get_logger(__name__)


def watchlist_top_n_refresh(*, n: int | None = None, feed: Any = None, exchange: Any = None) -> TopNReport:
    """The top-N selection on OKX's tickers, keeping every instrument with an open position enabled."""
    from execution.exchanges import exchange_from_settings
    from execution.selectors import positions_open
    from market.feeds import okx_feed_from_settings

    n = settings.WATCHLIST_TOP_N if n is None else n
    own_feed = feed is None
    feed = feed or okx_feed_from_settings()
    try:
        keep = {p.inst_id for p in positions_open(exchange=exchange or exchange_from_settings())}
        return watchlist_top_n(feed=feed, n=min(n, settings.WATCHLIST_MAX_ENABLED), keep=keep)
    finally:
        if own_feed:
            feed.close()


def beat_resync(sender: Any = None, inst_ids: list[str] | None = None, **_: Any) -> None:
    """`watchlist_changed`: one cycle entry per enabled instrument (beat reads the entries from the database)."""
    from tradebot.beat import beat_sync

    entries = beat_sync()
    log.info("watchlist.beat_synced", changed=inst_ids or [], entries=len(entries))


def connect() -> None:
    watchlist_changed.connect(beat_resync, dispatch_uid="tradebot.watchlist.beat_resync")
