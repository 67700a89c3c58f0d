"""Screener accuracy: passes the analyst acted on, and what the analyst did in bypassed cycles."""
from __future__ import annotations

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.test import Client

from journal.models import Mode, ScreenerLog
from journal.selectors import screener_accuracy
from market.models import Instrument


@pytest.fixture
def logs(db) -> Instrument:
    inst = Instrument.objects.create(inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"))
    rows = [
        # screener asked: 4 passes (3 answered: 2 acted, 1 HOLD; 1 cycle ended before the analyst), 2 no-signal
        (True, False, "OPEN_LONG"), (True, False, "OPEN_SHORT"), (True, False, "HOLD"), (True, False, ""),
        (False, False, ""), (False, False, ""),
        # bypassed (screener not asked): analyst acted once in three answers
        (True, True, "CLOSE"), (True, True, "HOLD"), (True, True, "HOLD"),
    ]
    for signal, bypassed, action in rows:
        ScreenerLog.objects.create(instrument=inst, signal=signal, bypassed=bypassed, analyst_action=action, mode=Mode.LIVE)
    # A replay row must not count in the live figures.
    ScreenerLog.objects.create(instrument=inst, signal=True, bypassed=False, analyst_action="HOLD", mode=Mode.REPLAY)
    return inst


def test_accuracy_counts_acted_passes_and_acted_bypasses(logs) -> None:
    acc = screener_accuracy(mode=Mode.LIVE)
    assert (acc.screened, acc.passes, acc.passes_answered, acc.passes_acted) == (6, 4, 3, 2)
    assert (acc.bypassed, acc.bypassed_answered, acc.bypassed_acted) == (3, 3, 1)
    assert acc.pass_acted_share == Decimal("0.6667") and acc.bypassed_acted_share == Decimal("0.3333")
    assert acc.pass_rate == Decimal("0.6667")
    everything = screener_accuracy()
    assert (everything.passes_answered, everything.passes_acted) == (4, 2)


def test_accuracy_with_no_rows_is_undefined_not_zero(db) -> None:
    acc = screener_accuracy(mode=Mode.LIVE)
    assert acc.pass_acted_share is None and acc.bypassed_acted_share is None
    assert "n/a" in acc.lines()[1]


def test_llm_cost_prints_the_screener_accuracy(logs) -> None:
    out = StringIO()
    call_command("llm", "cost", "--days", "1", stdout=out)
    text = out.getvalue()
    assert "screener accuracy over 1 day(s) (live):" in text
    assert "analyst acted on 2 of 3 answered pass(es): 66.7%" in text
    assert "analyst acted in 1 of 3 answered: 33.3%" in text


def test_the_screener_log_admin_list_shows_the_accuracy_of_the_filtered_rows(logs, admin_client: Client) -> None:
    client = admin_client
    page = client.get("/admin/journal/screenerlog/", {"mode__exact": "live"}).content.decode()
    assert 'id="screener-accuracy"' in page and "analyst acted on 2 of 3 answered pass(es): 66.7%" in page
    replay = client.get("/admin/journal/screenerlog/", {"mode__exact": "replay"}).content.decode()
    assert "analyst acted on 0 of 1 answered pass(es): 0.0%" in replay
