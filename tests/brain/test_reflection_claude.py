"""Deep reflection and post-trade review through the real anthropic SDK against the local Messages API server."""
from __future__ import annotations

import copy
import json

import pytest

from brain.models import PlaybookStatus, PlaybookVersion
from brain.playbook import playbook_current
from brain.reflection import deep_reflection_run, trade_review_run
from journal.models import LlmCall, ReflectionLog
from tests.brain.test_reflection import make_trade
from tests.fakes.anthropic_server import ok


@pytest.fixture
def trades(instrument, anthropic_server):
    return [make_trade(instrument, i, "-25") for i in range(3)]


def answer(playbook: dict, **extra) -> dict:
    return {"updated_playbook_json": json.dumps(playbook), "pattern_insights": ["breakouts fail"], "bias_findings": [],
            "discipline_score": 80, "summary": extra.pop("summary", "tighten breakouts"), "changes": extra.pop("changes", []), **extra}


def assert_current_in_force(v1: PlaybookVersion) -> None:
    assert playbook_current().pk == v1.pk
    assert PlaybookVersion.objects.count() == 1


def test_an_invalid_playbook_leaves_the_current_one_in_force(db, trades, anthropic_server) -> None:
    v1 = playbook_current()
    bad = copy.deepcopy(v1.playbook)
    bad["strategy_definitions"]["momentum_breakout"]["params"]["target_atr_mult"] = 0.5  # below its stop: invalid
    anthropic_server.script(ok(data=answer(bad)))
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "invalid"
    assert "invalid" in outcome.reason and "target_atr_mult" in outcome.reason
    row = ReflectionLog.objects.get(pk=outcome.log_id)
    assert row.status == "invalid" and row.new_version is None and "target_atr_mult" in row.output_json["error"]
    assert_current_in_force(v1)


def test_an_answer_without_json_leaves_the_current_playbook_in_force(db, trades, anthropic_server) -> None:
    v1 = playbook_current()
    anthropic_server.script(ok("I have reviewed your trades and I think you should trade less."))
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "invalid" and "invalid" in outcome.reason
    assert LlmCall.objects.filter(purpose="deep_reflection").count() == 2  # one stricter retry, then give up
    assert sorted(ReflectionLog.objects.get(pk=outcome.log_id).trade_ids) == sorted(t.pk for t in trades)
    assert_current_in_force(v1)


def test_a_lesson_citing_a_trade_that_does_not_exist_is_dropped(db, trades, anthropic_server) -> None:
    v1 = playbook_current()
    proposed = copy.deepcopy(v1.playbook)
    proposed["lessons_learned"].append({"id": "L9", "date": "2026-03-02", "lesson": "breakouts on Sundays always fail",
                                        "evidence": "trade 424242", "impact": "high", "evidence_trade_ids": [424242]})
    proposed["lessons_learned"].append({"id": "L10", "date": "2026-03-02", "lesson": "a lesson with no evidence",
                                        "evidence": "", "impact": "low"})
    anthropic_server.script(ok(data=answer(proposed)))
    outcome = deep_reflection_run(force=True)
    assert {d["lesson"]["id"] for d in outcome.dropped} == {"L9", "L10"}
    assert "424242" in next(d["reason"] for d in outcome.dropped if d["lesson"]["id"] == "L9")
    # Without the invented lessons nothing is left to change.
    assert outcome.status == "no_change"
    row = ReflectionLog.objects.get(pk=outcome.log_id)
    assert {d["lesson"]["id"] for d in row.playbook_changes["dropped_lessons"]} == {"L9", "L10"}
    assert_current_in_force(v1)


def test_a_lesson_citing_real_trades_becomes_a_candidate(db, trades, anthropic_server) -> None:
    v1 = playbook_current()
    proposed = copy.deepcopy(v1.playbook)
    proposed["strategy_definitions"]["momentum_breakout"]["params"]["volume_min"] = 2.0
    cited = [trades[0].pk, trades[1].pk]
    proposed["lessons_learned"].append({"id": "L1", "date": "2026-03-02", "lesson": "breakouts need more volume",
                                        "evidence": "stopped out twice", "impact": "medium", "evidence_trade_ids": cited})
    change = {"path": "strategy_definitions.momentum_breakout.params.volume_min", "old": "1.5", "new": "2.0",
              "reason": "stopped out on thin volume", "evidence_trade_ids": cited}
    anthropic_server.script(ok(data=answer(proposed, changes=[change])))
    outcome = deep_reflection_run(force=True)
    assert outcome.status == "done" and outcome.dropped == []
    candidate = PlaybookVersion.objects.get(version=outcome.candidate_version)
    assert candidate.status == PlaybookStatus.CANDIDATE
    assert candidate.playbook["lessons_learned"][-1]["evidence_trade_ids"] == cited
    assert f"evidence trades {cited}" in candidate.change_summary
    assert playbook_current().pk == v1.pk
    request = anthropic_server.bodies()[0]
    assert "<breakdown_by_strategy>" in request["messages"][0]["content"]


def test_post_trade_review_through_claude_is_stored(db, trades, anthropic_server) -> None:
    review = {"outcome": "loss", "execution_quality": "acceptable", "entry_timing": "late", "exit_timing": "good",
              "what_went_right": ["stop respected"], "what_went_wrong": ["chased the breakout"], "lesson": "wait for a retest",
              "should_update_playbook": True, "playbook_suggestion": "require a retest on breakouts"}
    anthropic_server.script(ok(data=review))
    row = trade_review_run(trade_id=trades[0].pk)
    assert row.status == "done" and row.output_json["llm_status"] == "ok"
    trades[0].refresh_from_db()
    assert trades[0].self_review["playbook_suggestion"] == "require a retest on breakouts"
    assert "quiet news day" in anthropic_server.bodies()[0]["messages"][0]["content"]
