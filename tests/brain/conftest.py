from __future__ import annotations

from decimal import Decimal

import pytest

from market.models import Instrument
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.perplexity_server import FakePerplexity

TEST_KEY = "sk-ant-test-key-0123456789"


@pytest.fixture
def instrument(db) -> Instrument:
    return Instrument.objects.create(inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), max_lever=Decimal("100"))


def _reset(server) -> None:
    # One server per session (starting and stopping one per test costs ~0.5 s each).
    with server._lock:
        server.requests.clear()
        server._routes.clear()


@pytest.fixture(scope="session")
def _anthropic_session():
    with FakeAnthropic() as server:
        yield server


@pytest.fixture(scope="session")
def _perplexity_session():
    with FakePerplexity() as server:
        yield server


@pytest.fixture
def anthropic_server(settings, _anthropic_session):
    _reset(_anthropic_session)
    settings.ANTHROPIC_API_KEY = TEST_KEY
    settings.ANTHROPIC_BASE_URL = _anthropic_session.url
    settings.BRAIN = "claude"
    yield _anthropic_session
    _reset(_anthropic_session)


@pytest.fixture
def perplexity_server(settings, _perplexity_session):
    _reset(_perplexity_session)
    settings.PERPLEXITY_API_KEY = "pplx-test-key-0123456789"
    settings.PERPLEXITY_BASE_URL = _perplexity_session.url
    yield _perplexity_session
    _reset(_perplexity_session)
