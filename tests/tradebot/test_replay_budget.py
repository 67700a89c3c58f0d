"""A replay's LLM budget counts its own virtual days (brain.budget), not the wall clock's."""
from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from journal.models import JournalEvent, LlmCall, Mode
from market.feeds.synthetic import SyntheticFeed
from tests.fakes.anthropic_server import FakeAnthropic, Received, Reply, ok
from tradebot.replay import replay_run

INST = "BTC-USDT-SWAP"


@pytest.mark.django_db(transaction=True)
def test_a_replays_budget_resets_on_its_own_virtual_days(settings, anthropic_server: FakeAnthropic) -> None:
    # Each screener call costs $0.10 (100,000 input tokens on Haiku 4.5 at $1 per million); the budget is $0.35:
    # four calls a day reach it, then the gateway sends nothing more until the replay's next UTC day.
    settings.LLM_DAILY_BUDGET_USD = Decimal("0.35")
    settings.SCREENER_BYPASS_ON_NEWS = False

    def screener(received: Received) -> Reply:
        body = received.json()
        return ok(data={"signal": False, "reason": "nothing here"}, model=body["model"], input_tokens=100_000,
                  output_tokens=0)

    anthropic_server.handler(screener)
    feed = SyntheticFeed(seed=7, start=datetime(2025, 6, 15, tzinfo=UTC), end=datetime(2025, 8, 4, tzinfo=UTC))
    start = datetime(2025, 8, 1, tzinfo=UTC)
    summary = replay_run(inst_id=INST, start=start, end=start + timedelta(days=2), feed=feed, brain="claude",
                         cycle=timedelta(hours=1), run_id="budget-run")
    assert summary.cycles == 48  # 01:00 on day one to 00:00 on day three, hourly
    sent = LlmCall.objects.filter(cycle__run_id="budget-run")
    per_day = Counter(as_of.date().isoformat() for as_of in sent.values_list("cycle__as_of", flat=True))
    # All of it ran within one wall-clock day: on the wall clock the budget would have stopped after four calls.
    assert per_day == {"2025-08-01": 4, "2025-08-02": 4, "2025-08-03": 1}
    assert all(row.status == "ok" and row.mode == Mode.REPLAY for row in sent)
    degraded = JournalEvent.objects.filter(kind="llm_degrade_mode", data__run_id="budget-run")
    assert sorted(e.data["day"] for e in degraded) == ["2025-08-01", "2025-08-02"]
    assert all(e.mode == Mode.REPLAY for e in degraded)
    # The live bot's budget day is untouched by the replay's spending.
    assert not JournalEvent.objects.filter(kind="llm_degrade_mode", mode=Mode.LIVE).exists()
