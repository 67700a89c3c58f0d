"""Validated promotion: the rule (hand-made figures) and the replay plumbing (synthetic market)."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from brain.models import PlaybookStatus
from brain.performance import TradeRecord, performance_summarize
from brain.playbook import playbook_current, playbook_save
from journal.models import Mode, Trade
from tradebot.learning import ValidationError, playbook_candidate_validate, promotion_decide

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def summary(*pnls: str):
    return performance_summarize([TradeRecord(id=i, pnl_usd=Decimal(p), opened_at=T0 + timedelta(hours=i),
                                              closed_at=T0 + timedelta(hours=i, minutes=30)) for i, p in enumerate(pnls)],
                                 starting_equity=Decimal("10000"))


def test_a_candidate_with_a_worse_profit_factor_is_not_promoted(settings) -> None:
    settings.PLAYBOOK_VALIDATION_METRIC = "profit_factor"
    promoted, reason = promotion_decide(current=summary("100", "-50"), candidate=summary("60", "-50"))  # PF 2 vs 1.2
    assert not promoted and reason.startswith("worse profit_factor") and "1.2000 vs 2.0000" in reason


def test_a_candidate_that_stops_a_losing_strategy_is_promoted() -> None:
    # The active version loses (PF 0.5); the candidate trades nothing: undefined PF ranks as 1.0.
    promoted, reason = promotion_decide(current=summary("50", "-100"), candidate=summary())
    assert promoted and reason.startswith("not worse")


def test_a_deeper_drawdown_beyond_the_margin_blocks_promotion(settings) -> None:
    settings.PLAYBOOK_MAX_DRAWDOWN_MARGIN = Decimal("0.02")
    current = summary("100", "-50", "100")  # drawdown 50 / 10100
    deeper = summary("1000", "-300", "1000")  # PF 6.67 > 4, drawdown 300 / 11000 = 2.7%: 2.2 points deeper
    promoted, reason = promotion_decide(current=current, candidate=deeper)
    assert not promoted and "drawdown" in reason
    settings.PLAYBOOK_MAX_DRAWDOWN_MARGIN = Decimal("0.05")
    assert promotion_decide(current=current, candidate=deeper)[0]


def test_the_metric_is_a_setting(settings) -> None:
    settings.PLAYBOOK_VALIDATION_METRIC = "total_pnl"
    assert not promotion_decide(current=summary("100", "-50"), candidate=summary("40"))[0]  # 40 < 50
    assert promotion_decide(current=summary("100", "-50"), candidate=summary("60"))[0]


@pytest.fixture
def short_history(settings):
    settings.INDICATOR_HISTORY_CANDLES = 200
    from market.feeds.synthetic import SyntheticFeed

    end = datetime(2026, 1, 3, tzinfo=timezone.utc)
    return SyntheticFeed(seed=7, start=end - timedelta(days=40), end=end + timedelta(hours=1)), end


def test_validation_replays_both_versions_and_stores_the_figures(db, short_history, settings) -> None:
    settings.BRAIN = "rules"
    feed, end = short_history
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] = False
    candidate = playbook_save(data=data, change_summary="switch breakouts off", triggered_by="reflection", status=PlaybookStatus.CANDIDATE)
    outcome = playbook_candidate_validate(candidate_id=candidate.pk, days=1, feed=feed, end=end, cycle=timedelta(minutes=15),
                                          inst_ids=["BTC-USDT-SWAP"])
    candidate.refresh_from_db()
    figures = candidate.validation
    assert figures["current"]["version"] == v1.version and figures["candidate"]["version"] == candidate.version
    assert figures["reason"] == outcome.reason and figures["promoted"] == outcome.promoted
    assert figures["window"]["days"] == 1 and figures["metric"] == settings.PLAYBOOK_VALIDATION_METRIC
    # Each replay ran under its own run id, in replay mode: the live journal has no trade.
    run_ids = figures["current"]["run_ids"] + figures["candidate"]["run_ids"]
    assert len(set(run_ids)) == 2
    assert not Trade.objects.filter(mode=Mode.LIVE).exists()
    from journal.models import Cycle

    assert {c.playbook_version for c in Cycle.objects.filter(run_id=figures["candidate"]["run_ids"][0]).exclude(playbook_version=None)} <= {candidate.version}
    expected = PlaybookStatus.ACTIVE if outcome.promoted else PlaybookStatus.REJECTED
    assert candidate.status == expected
    with pytest.raises(ValidationError, match="not a candidate"):
        playbook_candidate_validate(candidate_id=candidate.pk, days=1, feed=feed, end=end)
