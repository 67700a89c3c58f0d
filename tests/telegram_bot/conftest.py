from __future__ import annotations

from decimal import Decimal

import pytest

from market.models import Instrument
from tests.fakes.telegram_server import TOKEN, FakeTelegram

READER = 111111111
READER_2 = 222222222
ADMIN = 333333333
STRANGER = 999999999


@pytest.fixture(scope="session")
def _telegram_session():
    with FakeTelegram() as server:
        yield server


@pytest.fixture
def telegram(settings, monkeypatch, _telegram_session):  # noqa: ANN001, ANN201
    """The bot configured against the local Bot API server: two reader chats and one admin chat."""
    _telegram_session.reset()
    if _telegram_session.server is None:  # a test stopped it
        _telegram_session.start()
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)  # what the log/journal redaction reads
    settings.TELEGRAM_BOT_TOKEN = TOKEN
    settings.TELEGRAM_BASE_URL = _telegram_session.base_url
    settings.TELEGRAM_CHAT_IDS = (READER, READER_2)
    settings.TELEGRAM_ADMIN_CHAT_IDS = (ADMIN,)
    settings.TELEGRAM_SILENT_HOURS = ""
    settings.TELEGRAM_COOLDOWN_SECONDS = 60
    settings.TELEGRAM_SEND_TIMEOUT_SECONDS = 2.0
    yield _telegram_session
    if _telegram_session.server is None:
        _telegram_session.start()
    _telegram_session.reset()


@pytest.fixture
def btc(db: None) -> Instrument:
    return Instrument.objects.create(inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"),
                                     trading_enabled=True)
