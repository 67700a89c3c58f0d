from __future__ import annotations

from decimal import Decimal

import pytest

from market.models import Instrument
from tests.execution.helpers import BTC


@pytest.fixture
def btc(db: None) -> Instrument:
    return Instrument.objects.create(inst_id=BTC, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
                                     tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True)


@pytest.fixture
def paper(btc: Instrument):
    from execution.exchanges.paper import PaperExchange

    return PaperExchange(start_balance=Decimal("10000"), slippage=Decimal("0.0005"), taker_fee=Decimal("0.0005"),
                         maker_fee=Decimal("0.0002"), maint_margin_rate=Decimal("0.004"))
