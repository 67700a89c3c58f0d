from __future__ import annotations

from decimal import Decimal

import pytest

from market.models import Instrument
from tests.conftest import reset_fake_server as _reset
from tests.fakes.perplexity_server import FakePerplexity


@pytest.fixture
def instrument(db) -> Instrument:
    return Instrument.objects.create(inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"))


@pytest.fixture(scope="session")
def _perplexity_session():
    with FakePerplexity() as server:
        yield server


@pytest.fixture
def perplexity_server(settings, _perplexity_session):
    _reset(_perplexity_session)
    settings.PERPLEXITY_API_KEY = "pplx-test-key-0123456789"
    settings.PERPLEXITY_BASE_URL = _perplexity_session.url
    yield _perplexity_session
    _reset(_perplexity_session)
