"""Market feeds behind one interface (`market.feeds.base.MarketFeed`).

`feed_from_settings()` picks the source from `settings.MARKET_DATA_SOURCE`:
"okx" (public REST via python-okx), "synthetic" (the seeded SYN market),
"replay" (the replay directory in `settings.MARKET_REPLAY_DIR`: candles that
`manage.py demo` fetched from OKX, replayed on the cycle's virtual clock) or
"auto": OKX when a short probe answers. When it does not, "auto" raises
`MarketUnavailable` saying so: synthetic data is never presented as the market
unless it was asked for ("synthetic"), so a command exits non-zero and a
worker's cycle fails instead of trading made-up prices (#16). It always logs
which source is in use and why.
"""
from __future__ import annotations

import time

from django.conf import settings

from market.feeds.base import FeedError, MarketFeed
import structlog

log = structlog.get_logger(__name__)
SOURCES = ("auto", "okx", "synthetic", "replay")


class MarketUnavailable(FeedError):
    """No market data: OKX did not answer and synthetic data was not asked for."""


def okx_feed_from_settings(*, timeout: float | None = None) -> MarketFeed:
    from market.feeds.okx import OkxFeed

    return OkxFeed(base_url=settings.OKX_BASE_URL, flag="1" if settings.OKX_DEMO else "0",
                   timeout=timeout if timeout is not None else settings.OKX_TIMEOUT_SECONDS)


def synthetic_feed_from_settings() -> MarketFeed:
    from market.feeds.synthetic import SyntheticFeed

    return SyntheticFeed(seed=settings.SYNTHETIC_SEED)


def replay_feed_from_settings() -> MarketFeed:
    from market.feeds.replay import ReplayFeed

    return ReplayFeed.from_dir(settings.MARKET_REPLAY_DIR)


def feed_from_settings(*, source: str | None = None) -> MarketFeed:
    """The market feed the settings ask for (see the module docstring)."""
    source = source or settings.MARKET_DATA_SOURCE
    if source not in SOURCES:
        raise ValueError(f"market data source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "okx":
        log.info("market_data.source", source="okx", base_url=settings.OKX_BASE_URL, reason="configured")
        return okx_feed_from_settings()
    if source == "synthetic":
        log.info("market_data.source", source="synthetic", seed=settings.SYNTHETIC_SEED, reason="configured")
        return synthetic_feed_from_settings()
    if source == "replay":
        log.info("market_data.source", source="replay", path=str(settings.MARKET_REPLAY_DIR), reason="configured")
        return replay_feed_from_settings()
    probe_timeout = settings.MARKET_PROBE_TIMEOUT_SECONDS
    probe = okx_feed_from_settings(timeout=probe_timeout)
    started = time.monotonic()
    try:
        probe.system_time()  # type: ignore[attr-defined]
    except FeedError as e:
        probe.close()  # type: ignore[attr-defined]
        reason = f"OKX at {settings.OKX_BASE_URL} did not answer a {probe_timeout}s probe: {e}"
        log.warning("market_data.unavailable", source="auto", reason=reason)
        raise MarketUnavailable(f"no market data: {reason}. Synthetic data is used only when asked for "
                                "(--source synthetic, or MARKET_DATA_SOURCE=synthetic)") from e
    probe.close()  # type: ignore[attr-defined]
    log.info("market_data.source", source="okx", base_url=settings.OKX_BASE_URL,
             reason=f"OKX answered the probe in {round((time.monotonic() - started) * 1000)} ms")
    return okx_feed_from_settings()


__all__ = ["MarketUnavailable", "feed_from_settings", "okx_feed_from_settings", "replay_feed_from_settings",
           "synthetic_feed_from_settings", "SOURCES"]
