"""The exchange boundary: `exchange_from_settings()` is the one place that picks the venue."""
from __future__ import annotations

from django.conf import settings

from execution.exchanges.base import (
    AccountState,
    ClosedPosition,
    Exchange,
    ExchangeError,
    ExchangeOrder,
    ExchangeRejected,
    ExchangeTemporaryError,
    ExchangeUnknownOutcome,
    ExchangeUnreachable,
    LiveTradingRefused,
    Position,
    UnapprovedOrder,
)
import structlog

log = structlog.get_logger(__name__)

__all__ = [
    "AccountState", "ClosedPosition", "Exchange", "ExchangeError", "ExchangeOrder", "ExchangeRejected",
    "ExchangeTemporaryError", "ExchangeUnknownOutcome", "ExchangeUnreachable", "LiveTradingRefused", "Position",
    "UnapprovedOrder",
    "exchange_from_settings",
]


def exchange_from_settings() -> Exchange:
    """OKX (demo unless live trading is set AND confirmed) when all three OKX keys are set, else paper."""
    if settings.OKX_API_KEY and settings.OKX_API_SECRET and settings.OKX_PASSPHRASE:
        from execution.exchanges.okx import OkxExchange

        log.info("exchange_selected", exchange="okx", demo=settings.OKX_DEMO, base_url=settings.OKX_BASE_URL)
        return OkxExchange(
            api_key=settings.OKX_API_KEY, api_secret=settings.OKX_API_SECRET, passphrase=settings.OKX_PASSPHRASE,
            base_url=settings.OKX_BASE_URL, demo=settings.OKX_DEMO, timeout=settings.OKX_TIMEOUT_SECONDS,
            max_retries=settings.OKX_MAX_RETRIES,
        )
    from execution.exchanges.paper import PaperExchange

    log.info("exchange_selected", exchange="paper", reason="no OKX API keys set")
    return PaperExchange()
