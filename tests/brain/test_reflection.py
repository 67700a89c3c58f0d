"""Post-trade reviews and deep reflection with the rules brain (no network)."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from brain.claude import ClaudeBrain
from brain.models import PlaybookStatus, PlaybookVersion
from brain.playbook import playbook_current
from brain.reflection import ReflectionError, deep_reflection_due, deep_reflection_run, trade_review_run
from brain.schemas import TradeReview, TradeView
from journal.models import JournalEvent, LlmCall, ReflectionLog, ReflectionType, Trade, TradeStatus
from market.models import Instrument
from tests.fakes.anthropic_server import ok, proxy_page

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)


def make_trade(instrument: Instrument, i: int, pnl: str, *, strategy: str = "momentum_breakout", exit_reason: str = "stop_loss",
               status: str = TradeStatus.CLOSED, confidence: str = "0.6") -> Trade:
    opened = T0 + timedelta(hours=i)
    return Trade.objects.create(
        instrument=instrument, opened_at=opened, closed_at=opened + timedelta(minutes=40) if status == TradeStatus.CLOSED else None,
        direction="LONG", entry_price=Decimal("70000"), exit_price=Decimal("69500"), stop_loss=Decimal("69500"),
        take_profit=Decimal("71000"), size=Decimal("1"), pnl_usd=Decimal(pnl) if status == TradeStatus.CLOSED else None,
        strategy_used=strategy, market_regime="volatile", confidence_at_entry=Decimal(confidence), exit_reason=exit_reason,
        status=status, reasoning="breakout with volume", indicators_entry={"15m": {"rsi_14": 66}},
        indicators_exit={"15m": {"rsi_14": 48}}, research_context={"summary": "quiet news day"},
    )


@pytest.fixture
def rules(settings):
    settings.BRAIN = "rules"
    settings.ANTHROPIC_API_KEY = ""


@pytest.fixture
def losing_breakouts(instrument, rules) -> list[Trade]:
    """Six momentum breakouts stopped out, two winning trend pullbacks."""
    trades = [make_trade(instrument, i, "-25") for i in range(6)]
    trades += [make_trade(instrument, 10 + i, "60", strategy="trend_pullback", exit_reason="take_profit") for i in range(2)]
    return trades


def test_deep_reflection_with_no_trades_says_so_and_changes_nothing(db, rules) -> None:
    before = playbook_current()
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "no_trades"
    assert "no closed trades" in outcome.reason
    row = ReflectionLog.objects.get(pk=outcome.log_id)
    assert row.status == "no_trades" and row.trade_ids == [] and row.new_version is None
    assert list(PlaybookVersion.objects.values_list("version", flat=True)) == [before.version]
    assert playbook_current().pk == before.pk


def test_deep_reflection_is_not_due_before_the_trade_or_hour_interval(db, instrument, rules, settings) -> None:
    settings.REFLECTION_INTERVAL_TRADES = 3
    make_trade(instrument, 0, "-5")
    due, why = deep_reflection_due(now=T0 + timedelta(hours=1))
    assert not due and "not due" in why
    assert deep_reflection_run(now=T0 + timedelta(hours=1)).status == "not_due"
    make_trade(instrument, 1, "-5")
    make_trade(instrument, 2, "-5")
    assert deep_reflection_due(now=T0 + timedelta(hours=1))[0]
    settings.REFLECTION_INTERVAL_TRADES = 20
    # Six hours after the first pending trade closed, even three trades are enough.
    assert deep_reflection_due(now=T0 + timedelta(hours=7))[0]


def test_rules_reflection_proposes_switching_off_the_losing_strategy_with_evidence(db, losing_breakouts) -> None:
    v1 = playbook_current()
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "done", outcome.reason
    candidate = PlaybookVersion.objects.get(version=outcome.candidate_version)
    assert candidate.status == PlaybookStatus.CANDIDATE and candidate.triggered_by == "reflection"
    assert candidate.playbook["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] is False
    assert v1.playbook["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] is True
    assert playbook_current().pk == v1.pk  # a candidate does not trade before validation
    breakout_ids = sorted(t.pk for t in losing_breakouts[:6])
    assert "momentum_breakout.params.enabled: True -> False" in candidate.change_summary
    assert str(breakout_ids) in candidate.change_summary
    lesson = candidate.playbook["lessons_learned"][-1]
    assert sorted(lesson["evidence_trade_ids"]) == breakout_ids
    row = ReflectionLog.objects.get(pk=outcome.log_id)
    assert row.status == "done" and row.old_version == v1.version and row.new_version == candidate.version
    assert sorted(row.trade_ids) == sorted(t.pk for t in losing_breakouts)
    for section in ("<performance_summary>", "<breakdown_by_strategy>", "<breakdown_by_regime>", "<breakdown_by_time>",
                    "<confidence_calibration>", "<individual_trade_reviews>", "<current_playbook", "<tasks>"):
        assert section in row.input_prompt
    change = row.playbook_changes["changes"][0]
    assert change["path"].endswith("momentum_breakout.params.enabled") and sorted(change["evidence_trade_ids"]) == breakout_ids
    # The same trades are not reflected on twice.
    again = deep_reflection_run(force=True)
    assert again.status == "no_trades"
    assert PlaybookVersion.objects.count() == 2


def test_post_trade_review_is_stored_once_on_the_trade_and_in_the_log(db, losing_breakouts) -> None:
    trade = losing_breakouts[0]
    row = trade_review_run(trade_id=trade.pk)
    assert row.status == "done" and row.reflection_type == ReflectionType.POST_TRADE and row.trade_ids == [trade.pk]
    review = row.output_json["review"]
    assert review["outcome"] == "loss" and review["should_update_playbook"] is True
    assert "indicators at entry" in row.input_prompt and "quiet news day" in row.input_prompt
    trade.refresh_from_db()
    assert trade.self_review["outcome"] == "loss" and trade.self_review["reflection_log_id"] == row.pk
    assert trade_review_run(trade_id=trade.pk).pk == row.pk
    assert ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE).count() == 1
    # The suggestion reaches the next deep reflection.
    outcome = deep_reflection_run(force=True)
    prompt = ReflectionLog.objects.get(pk=outcome.log_id).input_prompt
    assert f'"trade_id": {trade.pk}' in prompt and "pending_playbook_suggestions" in prompt


class BrainBug(RuntimeError):
    """A defect in our own brain code: the one way left for a review to raise (the network boundary cannot)."""


def test_a_review_whose_brain_raises_is_marked_failed_and_journaled_and_the_next_request_reviews_it(
        db, instrument, anthropic_server, monkeypatch) -> None:
    trade = make_trade(instrument, 0, "-25")
    review = {"outcome": "loss", "execution_quality": "good", "entry_timing": "late", "exit_timing": "good",
              "what_went_right": ["stop respected"], "what_went_wrong": ["chased the breakout"],
              "lesson": "wait for the retest", "should_update_playbook": False}
    anthropic_server.script(ok(data=review))

    def review_with_a_bug(self: ClaudeBrain, *, trade: TradeView, cycle_id: int | None = None,
                          mode: str = "live") -> TradeReview:
        raise BrainBug(f"review of trade {trade.id} hit a bug")

    # Stands for a bug in the brain: the LLM gateway turns API and proxy trouble into an "error" result
    # (and the Claude brain into the rules review), so only our own code can make a review raise now.
    with monkeypatch.context() as patch:
        patch.setattr(ClaudeBrain, "review_trade", review_with_a_bug)
        with pytest.raises(BrainBug) as raised:  # re-raised for the caller (the Celery task)
            trade_review_run(trade_id=trade.pk)
    failed = ReflectionLog.objects.get(reflection_type=ReflectionType.POST_TRADE, trade_ids=[trade.pk])
    assert failed.status == "failed"
    assert failed.output_json["brain"] == "claude" and "lease" not in failed.output_json
    assert "claude brain failed" in failed.output_json["error"] and type(raised.value).__name__ in failed.output_json["error"]
    event = JournalEvent.objects.get(kind="trade_review_failed")
    assert event.level == "error" and event.instrument_id == instrument.pk
    assert event.data["trade_id"] == trade.pk and event.data["reflection_log_id"] == failed.pk
    assert f"trade {trade.pk}" in event.message and type(raised.value).__name__ in event.message
    trade.refresh_from_db()
    assert trade.self_review is None  # no review was made

    # A failed review does not count as one: the next request reviews the trade.
    done = trade_review_run(trade_id=trade.pk)
    assert done.pk != failed.pk and done.status == "done"
    assert done.output_json["review"]["lesson"] == "wait for the retest"
    trade.refresh_from_db()
    assert trade.self_review["reflection_log_id"] == done.pk
    failed.refresh_from_db()
    assert failed.status == "failed"  # kept as the record of the failed attempt
    assert trade_review_run(trade_id=trade.pk).pk == done.pk  # and now it is reviewed once


def test_a_proxy_page_instead_of_the_api_gives_the_rules_review_with_the_reason_not_a_failure(
        db, instrument, anthropic_server, settings) -> None:
    settings.REFLECTION_TIMEOUT_SECONDS = 1.0  # the page every time: no time for a retry
    trade = make_trade(instrument, 0, "-25")
    anthropic_server.script(proxy_page())
    row = trade_review_run(trade_id=trade.pk)
    assert row.status == "done" and row.output_json["brain"] == "claude" and row.output_json["llm_status"] == "error"
    lesson = row.output_json["review"]["lesson"]
    assert "LLM review error: the API answered with something that is not a Messages response" in lesson
    call = LlmCall.objects.get(pk__in=row.output_json["llm_call_ids"])
    assert call.status == "error" and call.completed_at is not None and "text/html" in call.parse_error
    assert not JournalEvent.objects.filter(kind="trade_review_failed").exists()


def test_an_open_or_missing_trade_is_not_reviewed(db, instrument, rules) -> None:
    open_trade = make_trade(instrument, 0, "0", status=TradeStatus.OPEN)
    with pytest.raises(ReflectionError, match="not closed"):
        trade_review_run(trade_id=open_trade.pk)
    with pytest.raises(ReflectionError, match="does not exist"):
        trade_review_run(trade_id=999999)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_crashed_deep_reflection_is_resumed_with_the_same_trades_and_applied_once(db, losing_breakouts) -> None:
    import socket

    v1 = playbook_current()
    ids = [t.pk for t in losing_breakouts]
    # What a process killed mid-reflection leaves behind: the claim, holding the trades, with its lease.
    until = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    crashed = ReflectionLog.objects.create(reflection_type=ReflectionType.PERIODIC, status="running", trade_ids=ids,
                                           old_version=v1.version,
                                           output_json={"lease": {"owner": f"{socket.gethostname()}:{_dead_pid()}", "until": until}})
    # A new trade closes meanwhile: it is not part of the resumed reflection.
    later = make_trade(losing_breakouts[0].instrument, 30, "5", strategy="trend_pullback", exit_reason="take_profit")
    outcome = deep_reflection_run(force=True)
    assert outcome.resumed and outcome.log_id == crashed.pk and outcome.status == "done"
    assert sorted(outcome.trade_ids) == sorted(ids)
    assert PlaybookVersion.objects.filter(status=PlaybookStatus.CANDIDATE).count() == 1
    # Rerun: only the later trade is pending; the first candidate is not stored again.
    rerun = deep_reflection_run(force=True)
    assert rerun.log_id != crashed.pk and rerun.trade_ids == [later.pk]
    assert PlaybookVersion.objects.filter(triggered_by="reflection", performance_at_update__reflection_log_id=crashed.pk).count() == 1


def test_a_reflection_whose_owner_is_alive_is_not_taken_over(db, losing_breakouts) -> None:
    import socket

    until = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    ReflectionLog.objects.create(reflection_type=ReflectionType.PERIODIC, status="running", trade_ids=[losing_breakouts[0].pk],
                                 output_json={"lease": {"owner": f"{socket.gethostname()}:{os.getppid()}", "until": until}})
    assert deep_reflection_run(force=True).status == "busy"
    assert PlaybookVersion.objects.filter(status=PlaybookStatus.CANDIDATE).count() == 0


def test_a_statistics_only_reflection_creates_no_version_and_records_an_observation(db, instrument, rules) -> None:
    from brain.models import PlaybookObservation

    # Three trades of one strategy: below learning.min_trades, so only its win rate, R:R and calibration change.
    trades = [make_trade(instrument, 0, "-25"), make_trade(instrument, 1, "40", exit_reason="take_profit"),
              make_trade(instrument, 2, "-10")]
    v1 = playbook_current()
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "no_change" and "statistics recorded as observation" in outcome.reason, outcome.reason
    assert list(PlaybookVersion.objects.values_list("version", flat=True)) == [v1.version]
    observation = PlaybookObservation.objects.get()
    assert observation.version_id == v1.pk and sorted(observation.trade_ids) == sorted(t.pk for t in trades)
    stats = observation.statistics
    assert stats["strategies"]["momentum_breakout"]["historical_winrate"] == round(1 / 3, 4)
    assert stats["confidence_calibration"]["0.6-0.7"]["trades"] == 3
    # The next reflection starts from what was observed (the playbook plus the newest statistics).
    from brain.playbook import playbook_observed

    assert playbook_observed(v1)["strategy_definitions"]["momentum_breakout"]["historical_winrate"] == round(1 / 3, 4)
    assert v1.playbook["strategy_definitions"]["momentum_breakout"]["historical_winrate"] != round(1 / 3, 4)


def test_a_candidate_lists_the_trading_fields_it_changes_why_and_the_trades_and_window_it_learned_from(
        db, losing_breakouts) -> None:
    outcome = deep_reflection_run(force=True)
    candidate = PlaybookVersion.objects.get(version=outcome.candidate_version)
    breakout_ids = sorted(t.pk for t in losing_breakouts[:6])
    by_path = {c["path"]: c for c in candidate.changes}
    # Statistics (win rates, calibration) are not listed: only what trades.
    assert set(by_path) == {"strategy_definitions.momentum_breakout.params.enabled", "lessons_learned"}
    enabled = by_path["strategy_definitions.momentum_breakout.params.enabled"]
    assert (enabled["old"], enabled["new"], enabled["read_by"]) == (True, False, "rules")
    assert "profit factor" in enabled["reason"] and sorted(enabled["evidence_trade_ids"]) == breakout_ids
    assert sorted(by_path["lessons_learned"]["evidence_trade_ids"]) == breakout_ids
    assert candidate.evidence["from"] == min(t.opened_at for t in losing_breakouts).isoformat()
    assert candidate.evidence["to"] == max(t.closed_at for t in losing_breakouts).isoformat()


def _losing_breakout(instrument: Instrument, i: int, version: int) -> Trade:
    trade = make_trade(instrument, i, "-25")
    Trade.objects.filter(pk=trade.pk).update(playbook_version=version)
    return trade


def test_a_reflection_judges_the_new_trades_with_the_versions_earlier_ones_and_not_another_versions(
        db, instrument, rules) -> None:
    v1 = playbook_current()
    for i in range(4):  # too few of one strategy for a verdict: statistics only
        _losing_breakout(instrument, i, v1.version)
    other = _losing_breakout(instrument, 5, v1.version + 7)  # another version's trade: never in v1's window
    Trade.objects.filter(pk=other.pk).update(strategy_used="trend_pullback", pnl_usd=Decimal("40"))
    first = deep_reflection_run(force=True)
    assert first.status == "no_change" and first.candidate_version is None, first.reason
    new = [_losing_breakout(instrument, 6 + i, v1.version) for i in range(2)]
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "done", outcome.reason  # 4 earlier + 2 new breakouts of v1: switched off
    row = ReflectionLog.objects.get(pk=outcome.log_id)
    earlier = list(Trade.objects.filter(playbook_version=v1.version).exclude(pk__in=[t.pk for t in new])
                   .order_by("closed_at").values_list("pk", flat=True))
    assert len(earlier) == 4 and row.trade_ids == [*earlier, *(t.pk for t in new)] and other.pk not in row.trade_ids
    candidate = PlaybookVersion.objects.get(version=outcome.candidate_version)
    assert candidate.playbook["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] is False


def test_a_change_rejected_against_the_active_version_is_proposed_again_only_after_a_window_of_new_trades(
        db, instrument, rules, settings) -> None:
    settings.REFLECTION_WINDOW_TRADES = 6
    v1 = playbook_current()
    for i in range(6):
        _losing_breakout(instrument, i, v1.version)
    proposed = deep_reflection_run(force=True)
    assert proposed.status == "done", proposed.reason
    PlaybookVersion.objects.filter(version=proposed.candidate_version).update(
        status=PlaybookStatus.REJECTED, validated_against=v1.version)
    _losing_breakout(instrument, 10, v1.version)
    again = deep_reflection_run(force=True)
    assert again.status == "no_change" and again.candidate_version is None
    assert f"proposed as v{proposed.candidate_version} (rejected by validation)" in again.reason
    assert "1 of v1's trades closed since its evidence, 6 needed" in again.reason
    assert PlaybookVersion.objects.count() == 2
    assert JournalEvent.objects.filter(kind="reflection_repeated").count() == 1
    for i in range(5):  # six new trades of v1 since that evidence: new evidence, proposed again
        _losing_breakout(instrument, 11 + i, v1.version)
    renewed = deep_reflection_run(force=True)
    assert renewed.status == "done" and renewed.candidate_version not in (None, proposed.candidate_version), renewed.reason
