"""The journal admin renders every list and detail page a trader uses, and is read-only."""
from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.test import Client

from journal.models import Cycle, CycleOutcome, CycleState, JournalEvent, RiskRejection, ScreenerLog, Trade
from market.models import Instrument

AS_OF = datetime(2025, 9, 5, 0, 30, tzinfo=UTC)


@pytest.fixture
def journal_rows(db) -> Cycle:
    inst = Instrument.objects.create(inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"),
                                     min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"), trading_enabled=True)
    cycle = Cycle.objects.create(
        instrument=inst, as_of=AS_OF, state=CycleState.DONE, outcome=CycleOutcome.TRADED, reason="OPEN_LONG",
        decision={"decision": {"action": "OPEN_LONG"}}, stage_times={"COLLECTING": {"duration_ms": 12.5}},
        order={"state": "FILLED"}, client_order_id="tbabc",
    )
    Trade.objects.create(instrument=inst, cycle=cycle, opened_at=AS_OF, direction="LONG", entry_price=Decimal("95000"),
                         stop_loss=Decimal("94000"), size=Decimal("0.4"), strategy_used="momentum_breakout",
                         market_regime="trending_up", client_order_id="tbabc", indicators_entry={"1H": {"rsi_14": 61.2}})
    ScreenerLog.objects.create(instrument=inst, cycle=cycle, signal=True, reason="<b>breakout</b>")
    RiskRejection.objects.create(instrument=inst, cycle=cycle, decision_json={}, failed_rules=[{"rule": "leverage", "reason": "5x"}])
    JournalEvent.objects.create(kind="cycle_failed", message="x", cycle=cycle)
    return cycle


@pytest.mark.parametrize("model", ["cycle", "trade", "screenerlog", "riskrejection", "llmcall", "reflectionlog",
                                   "performancesnapshot", "journalevent"])
def test_every_journal_list_renders_with_its_filters(admin_client: Client, journal_rows: Cycle, model: str) -> None:
    response = admin_client.get(f"/admin/journal/{model}/", {"q": "BTC"} if model in ("cycle", "trade") else {})
    assert response.status_code == 200


def test_a_cycle_page_links_to_its_orders_and_trades_and_shows_json(admin_client: Client, journal_rows: Cycle) -> None:
    page = admin_client.get(f"/admin/journal/cycle/{journal_rows.pk}/change/").content.decode()
    assert f"/admin/execution/order/?cycle__id__exact={journal_rows.pk}" in page or "orders" in page
    assert f"/admin/journal/trade/?cycle__id__exact={journal_rows.pk}" in page
    assert "&quot;action&quot;: &quot;OPEN_LONG&quot;" in page  # pretty JSON, escaped
    trade = Trade.objects.get()
    page = admin_client.get(f"/admin/journal/trade/{trade.pk}/change/").content.decode()
    assert f"/admin/journal/cycle/{journal_rows.pk}/change/" in page and "rsi_14" in page


def test_the_journal_cannot_be_edited_in_the_admin(admin_client: Client, journal_rows: Cycle) -> None:
    assert admin_client.get("/admin/journal/cycle/add/").status_code == 403
    response = admin_client.post(f"/admin/journal/cycle/{journal_rows.pk}/change/", {"reason": "edited"})
    assert response.status_code == 403
    journal_rows.refresh_from_db()
    assert journal_rows.reason == "OPEN_LONG"


def test_filtering_trades_by_strategy_and_regime(admin_client: Client, journal_rows: Cycle) -> None:
    page = admin_client.get("/admin/journal/trade/", {"strategy_used": "momentum_breakout", "market_regime": "trending_up"})
    assert page.status_code == 200 and "trade" in page.content.decode().lower()
    page = admin_client.get("/admin/journal/trade/", {"strategy_used": "none_such"}).content.decode()
    assert "0 trades" in page


def test_the_bot_controls_halt_and_resume_from_the_admin(admin_client: Client, journal_rows: Cycle) -> None:
    from execution.models import BotState

    assert admin_client.get("/admin/tradebot/botcontrol/").status_code == 200
    row = BotState.objects.get()
    admin_client.post("/admin/tradebot/botcontrol/", {"action": "halt", "_selected_action": [row.pk]})
    assert BotState.objects.get().state == "HALTED"
    admin_client.post("/admin/tradebot/botcontrol/", {"action": "resume", "_selected_action": [row.pk]})
    assert BotState.objects.get().state == "RUNNING"
