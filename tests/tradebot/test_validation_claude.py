"""Claude-aware validation through the real anthropic SDK against the local Messages API server.

One replay with the Claude brain records the cycles (screener says go, the analyst opens a long at every flat
cycle); a candidate that only adds a lesson (text the model reads) is then judged by re-deciding them.
"""
from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from brain.models import PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook import playbook_current, playbook_save
from journal.models import Cycle, LlmCall, Mode
from market.feeds.synthetic import SyntheticFeed
from tests.fakes.anthropic_server import FakeAnthropic, Received, Reply, ok
from tradebot.learning import Verdict, playbook_candidate_validate
from tradebot.replay import replay_run
from tradebot.replay_learn import ReplayLearner
from tradebot.validation_claude import NO_KEY_REASON, cycles_pick, prompt_for

BTC = "BTC-USDT-SWAP"
START = datetime(2025, 8, 1, tzinfo=UTC)
END = START + timedelta(hours=28)
CYCLE = timedelta(hours=4)  # few cycles: each asks the analyst (the screener is off), a new SDK client each time
RUN = "claude-recorded"
LESSON = "L-validate: prefer shorts after a long squeeze"
N = 4


def analyst(received: Received) -> Reply:
    """The analyst: a long at the cycle's price; a short when the playbook holds the new lesson. Reviews: a loss."""
    body = received.json()
    system = "".join(block["text"] for block in body["system"])
    if "Analyze this completed trade" in system:
        review = {"outcome": "loss", "execution_quality": "good", "entry_timing": "good", "exit_timing": "good",
                  "lesson": "stops work", "should_update_playbook": False}
        return ok(data=review, model=body["model"], input_tokens=1, output_tokens=1)
    user = body["messages"][0]["content"]
    price = float(re.search(r"^price ([0-9.]+) bid", user, re.MULTILINE).group(1))
    short = LESSON in system
    decision = {"action": "OPEN_SHORT" if short else "OPEN_LONG", "symbol": BTC, "size_pct": 0.03,
                "order_type": "market", "entry_price": price, "limit_price": None, "leverage": 2,
                "stop_loss": round(price * (1.01 if short else 0.99), 1),
                "take_profit": round(price * (0.98 if short else 1.02), 1)}
    answer = {"analysis": {"market_regime": "ranging", "bias": "bearish" if short else "bullish",
                           "key_observations": [], "risk_factors": []},
              "decision": decision, "confidence": 0.7, "strategy_used": "range_mean_reversion", "reasoning": "test"}
    return ok(data=answer, model=body["model"], input_tokens=1, output_tokens=1)


@pytest.mark.django_db
def test_claude_aware_validation_rebuilds_the_prompts_refuses_over_budget_and_re_decides_with_n_calls(
        settings, anthropic_server: FakeAnthropic, admin_client) -> None:
    settings.SCREENER_ENABLED = False  # every flat cycle goes to the analyst
    settings.INDICATOR_HISTORY_CANDLES = 200
    settings.PLAYBOOK_CLAUDE_VALIDATION_CYCLES = N
    settings.PLAYBOOK_CLAUDE_VALIDATION_HORIZON_HOURS = 6
    settings.PLAYBOOK_CLAUDE_VALIDATION_MIN_TRADES = 2
    settings.REFLECTION_INTERVAL_TRADES = settings.REFLECTION_INTERVAL_HOURS = 1000  # reviews only while recording
    anthropic_server.handler(analyst)
    feed = SyntheticFeed(seed=7, start=START - timedelta(days=40), end=END + timedelta(hours=12))
    learner = ReplayLearner(feed=feed, brain="claude", cycle=CYCLE)
    replay_run(inst_id=BTC, start=START, end=END, feed=feed, brain="claude", cycle=CYCLE, run_id=RUN,
               full_snapshots="analyzed", learn=learner)
    # replay --learn's reviews asked Claude on the replay's clock: each call on one of the run's cycles, so it
    # counts in that run's budget on its virtual day (brain.budget), not in the live bot's day.
    reviews = LlmCall.objects.filter(purpose="post_trade")
    assert learner.reviews >= 1 and reviews.count() == learner.reviews
    assert {r.cycle.run_id for r in reviews} == {RUN} and {r.mode for r in reviews} == {Mode.REPLAY}
    v1 = playbook_current()
    recorded_bodies = [r.json() for r in anthropic_server.requests]
    sent = {(tuple(b["text"] for b in body["system"]), body["messages"][0]["content"]) for body in recorded_bodies}

    # 1. For the unchanged playbook the rebuilt prompt is byte-equal to what each cycle sent (row and wire).
    picked = cycles_pick(count=N, end=END + timedelta(hours=12), horizon=timedelta(hours=6), evidence=None,
                         mode=Mode.REPLAY, run_id=RUN)
    assert len(picked) == N
    for rec in picked:
        rebuilt = prompt_for(rec, v1)
        original = LlmCall.objects.get(cycle_id=rec.cycle.pk, purpose="analyze").prompt
        assert [b["text"] for b in original["system"]] == rebuilt.static
        assert original["messages"] == [{"role": "user", "content": rebuilt.user}]
        assert (tuple(rebuilt.static), rebuilt.user) in sent

    data = copy.deepcopy(v1.playbook)
    data["lessons_learned"].append({"id": "L9", "date": "2025-08-01", "lesson": LESSON, "evidence_trade_ids": []})
    candidate = playbook_save(data=data, change_summary="a lesson", triggered_by=PlaybookTrigger.MANUAL)

    def validate():
        return playbook_candidate_validate(candidate_id=candidate.pk, feed=feed, end=END + timedelta(hours=12),
                                           inst_ids=[BTC], cycle=CYCLE, cycles_source=(Mode.REPLAY, RUN))

    # 2. An estimate over the budget refuses before any call: the day's spending alone is under it.
    settings.LLM_DAILY_BUDGET_USD = Decimal("0.01")
    refused = validate()
    assert refused.verdict == Verdict.WAITING and refused.reason.startswith("refused before any call"), refused.reason
    estimate = refused.figures["claude"]["estimate"]
    assert estimate["calls"] == N and Decimal(estimate["usd"]) > Decimal("0.01")
    assert len(anthropic_server.requests) == len(recorded_bodies)
    assert not LlmCall.objects.filter(purpose="validation").exists()
    candidate.refresh_from_db()
    assert candidate.status == PlaybookStatus.CANDIDATE and playbook_current().pk == v1.pk

    # 3. Without a key: not promoted automatically, and the reason says so; no call either.
    settings.ANTHROPIC_API_KEY = ""
    keyless = validate()
    assert keyless.verdict == Verdict.WAITING and NO_KEY_REASON in keyless.reason
    assert len(anthropic_server.requests) == len(recorded_bodies)

    # 4. Within the budget: exactly N calls (the active version's decisions are the recorded ones), each an LlmCall.
    settings.ANTHROPIC_API_KEY = "sk-ant-test-key-0123456789"
    settings.LLM_DAILY_BUDGET_USD = Decimal("10")
    outcome = validate()
    assert len(anthropic_server.requests) == len(recorded_bodies) + N
    rows = LlmCall.objects.filter(purpose="validation")
    assert rows.count() == N and {r.status for r in rows} == {"ok"} and {r.mode for r in rows} == {Mode.REPLAY}
    assert {r.cycle_id for r in rows} == {rec.cycle.pk for rec in picked}
    claude = PlaybookVersion.objects.get(pk=candidate.pk).validation["claude"]
    assert claude["calls"] == N and len(claude["cycles"]) == N
    for row in claude["cycles"]:
        assert row["active"]["source"] == "recorded" and row["active"]["action"] == "OPEN_LONG"
        assert row["candidate"]["source"] == "asked" and row["candidate"]["action"] == "OPEN_SHORT"
        for side in ("active", "candidate"):  # each simulated to its exit on the stored bars, fees paid
            assert row[side]["traded"] and row[side]["exit"] in ("take_profit", "stop_loss", "horizon", "liquidation")
            assert Decimal(row[side]["fees"]) > 0 and Decimal(row[side]["pnl"]) != 0
    assert outcome.verdict in (Verdict.PROMOTED, Verdict.REJECTED) and "re-decided cycles" in outcome.reason
    assert "no rules folds" in outcome.reason and outcome.figures["folds"] == []
    # The recorded cycles are untouched; the scratch paper accounts are gone.
    from execution.models import PaperAccount

    assert not PaperAccount.objects.filter(name__startswith="val-").exists()
    assert Cycle.objects.filter(run_id=RUN, brain_context__isnull=False).count() >= N
    page = admin_client.get(f"/admin/brain/playbookversion/{candidate.pk}/change/").content.decode()
    assert 'id="claude-verdict"' in page and "OPEN_SHORT (asked)" in page and "OPEN_LONG (recorded)" in page


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_playbook_read_back_from_postgresql_gives_the_same_prompt_bytes_as_when_it_was_saved() -> None:
    from brain.prompts import playbook_section

    saved = playbook_current()  # v1 as just stored: its keys in the order they were written
    again = PlaybookVersion.objects.get(pk=saved.pk)  # jsonb hands keys back in its own order
    assert list(again.playbook) != list(saved.playbook)  # (so this test means something)
    assert playbook_section(again.playbook, again.version) == playbook_section(saved.playbook, saved.version)
