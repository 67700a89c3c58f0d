"""Out-of-sample validation: the rule (hand-made folds), the fold placement, and replays on the synthetic market.

The replay tests trade a deliberately bad "scalper" (a 0.2/0.3 x 15m-ATR stop/target faded on every cycle: the
fees eat it) next to v1's strategies, made active by a person's forced activation; 1H cycles, three 2-day folds.
"""
from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from brain.models import PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook import playbook_activate_forced, playbook_current, playbook_save
from journal.models import Mode, Trade
from tradebot.learning import (FoldResult, ValidationError, Verdict, folds_place, playbook_candidate_validate,
                               promotion_decide)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
BTC = "BTC-USDT-SWAP"


def fold(day: int, active: list[str], candidate: list[str]) -> FoldResult:
    """One day-long fold; trade i of each side closes at hour i of that day."""
    start = T0 + timedelta(days=day)
    f = FoldResult(start=start, end=start + timedelta(days=1), equity=Decimal(10000))
    f.active = [(Decimal(p), start + timedelta(hours=i)) for i, p in enumerate(active)]
    f.candidate = [(Decimal(p), start + timedelta(hours=i)) for i, p in enumerate(candidate)]
    return f


def test_a_candidate_better_on_most_days_is_promoted_and_a_worse_one_is_rejected() -> None:
    better = [fold(d, ["-30", "-20"], ["10", "-5"]) for d in range(6)]
    verdict, reason, test = promotion_decide(folds=better, min_trades=10, probability=0.8, drawdown_margin=Decimal("0.02"))
    assert verdict == Verdict.PROMOTED and test["p_candidate_better"] > 0.8 and "better out of sample" in reason
    worse = [fold(d, ["10", "-5"], ["-30", "-20"]) for d in range(6)]
    verdict, reason, test = promotion_decide(folds=worse, min_trades=10, probability=0.8, drawdown_margin=Decimal("0.02"))
    assert verdict == Verdict.REJECTED and test["p_candidate_better"] < 0.2 and reason.startswith("not better")


def test_a_tie_never_promotes() -> None:
    same = [fold(d, ["10", "-5", "7"], ["10", "-5", "7"]) for d in range(6)]
    verdict, reason, test = promotion_decide(folds=same, min_trades=2, probability=0.5, drawdown_margin=Decimal("1"))
    assert verdict == Verdict.REJECTED and reason.startswith("tie") and test["p_candidate_better"] == 0.0


def test_too_few_closed_trades_wait_with_not_enough_evidence() -> None:
    few = [fold(0, ["-30"], ["10"])]
    verdict, reason, _ = promotion_decide(folds=few, min_trades=20, probability=0.8, drawdown_margin=Decimal("0.02"))
    assert verdict == Verdict.WAITING and reason.startswith("not enough evidence: 2 closed trades")
    assert promotion_decide(folds=[], min_trades=1)[0] == Verdict.WAITING


def test_one_fold_with_a_drawdown_worse_than_the_margin_blocks_promotion() -> None:
    folds = [fold(d, ["-30", "-20"], ["10", "-5"]) for d in range(5)]
    folds.append(fold(5, ["5"], ["-400", "500"]))  # better in sum, but a 4% drawdown in this fold
    verdict, reason, _ = promotion_decide(folds=folds, min_trades=10, probability=0.5, drawdown_margin=Decimal("0.02"))
    assert verdict == Verdict.REJECTED and reason.startswith("fold 6") and "margin" in reason
    assert promotion_decide(folds=folds, min_trades=10, probability=0.5, drawdown_margin=Decimal("0.05"))[0] == Verdict.PROMOTED


def test_folds_never_overlap_the_evidence_window() -> None:
    start, end = T0, T0 + timedelta(days=40)
    evidence = (T0 + timedelta(days=35, hours=6), T0 + timedelta(days=38))
    folds = folds_place(data_start=start, data_end=end, days=12, count=3, evidence=evidence)
    assert len(folds) == 3 and all(b - a == timedelta(days=4) for a, b in folds)
    assert all(b <= evidence[0] or a >= evidence[1] for a, b in folds)
    assert folds[-1][1] == evidence[0]  # the newest fold ends where the evidence starts (after it: only 2 days)
    assert folds == sorted(folds) and all(folds[i][1] <= folds[i + 1][0] for i in range(2))
    # No room before the data's warm-up: fewer folds (here none), never a fold inside the evidence.
    assert folds_place(data_start=start, data_end=end, days=100, count=3, evidence=None) == []


SCALPER = {
    "entry": "fade every tick", "exit": "tiny target", "filters": [],
    "params": {"enabled": True, "signal": "range_mean_reversion",
               "regimes": ["trending_up", "trending_down", "volatile", "ranging", "unknown"], "direction": "both",
               "atr_timeframe": "15m", "stop_atr_mult": 0.2, "target_atr_mult": 0.3, "size_pct": 0.02, "leverage": 1,
               "bb_long_max": 0.5, "bb_short_min": 0.5, "confidence": 0.7},
}


@pytest.fixture
def market(settings):
    settings.BRAIN = "rules"
    settings.ANTHROPIC_API_KEY = ""
    settings.INDICATOR_HISTORY_CANDLES = 200
    settings.PLAYBOOK_VALIDATION_MIN_TRADES = 10
    settings.PLAYBOOK_PROMOTION_PROBABILITY = 0.8
    from market.feeds.synthetic import SyntheticFeed

    end = datetime(2026, 1, 20, tzinfo=timezone.utc)
    return SyntheticFeed(seed=7, start=end - timedelta(days=25), end=end + timedelta(hours=1)), end


@pytest.fixture
def scalping(db) -> PlaybookVersion:
    """v2 = v1 plus the losing scalper, activated by a person (forced, journaled)."""
    data = copy.deepcopy(playbook_current().playbook)
    data["strategy_definitions"]["scalper"] = copy.deepcopy(SCALPER)
    for rule in data["market_regime_rules"].values():
        rule["preferred_strategies"] = ["scalper", *rule["preferred_strategies"]]
    v2 = playbook_save(data=data, change_summary="add a scalper", triggered_by=PlaybookTrigger.MANUAL)
    return playbook_activate_forced(version=v2.version, by="test", reason="try a scalper")


def candidate_of(active: PlaybookVersion, change, summary: str = "test change") -> PlaybookVersion:
    data = copy.deepcopy(active.playbook)
    change(data)
    return playbook_save(data=data, change_summary=summary, triggered_by=PlaybookTrigger.MANUAL)


def validate(candidate: PlaybookVersion, market, **kwargs):
    feed, end = market
    return playbook_candidate_validate(candidate_id=candidate.pk, days=6, folds=3, feed=feed, end=end,
                                       cycle=timedelta(hours=1), inst_ids=[BTC], **kwargs)


def scalper_off(data: dict) -> None:
    data["strategy_definitions"]["scalper"]["params"]["enabled"] = False


def test_switching_off_a_strategy_that_loses_in_every_fold_is_promoted_with_its_figures(market, scalping) -> None:
    candidate = candidate_of(scalping, scalper_off, "scalper off")
    outcome = validate(candidate, market)
    candidate.refresh_from_db()
    figures = candidate.validation
    assert len(figures["folds"]) == 3
    for f in figures["folds"]:  # the scalper version loses in every fold; the candidate trades far less
        assert Decimal(f["active"]["pnl"]) < 0 and f["candidate"]["trades"] < f["active"]["trades"]
    assert outcome.promoted and outcome.verdict == Verdict.PROMOTED, outcome.reason
    assert figures["test"]["p_candidate_better"] > 0.8 and figures["test"]["closed_trades"] >= 10
    assert candidate.status == PlaybookStatus.ACTIVE and playbook_current().pk == candidate.pk
    assert candidate.validated_against == scalping.version and candidate.activated_by == "validation"
    assert PlaybookVersion.objects.get(pk=scalping.pk).status == PlaybookStatus.RETIRED
    # Each replay ran under its own run id, in replay mode: the live journal has no trade.
    run_ids = [r for f in figures["folds"] for side in ("active", "candidate") for r in f["run_ids"][side]]
    assert len(set(run_ids)) == 6 and not Trade.objects.filter(mode=Mode.LIVE).exists()
    with pytest.raises(ValidationError, match="not a candidate"):
        validate(candidate, market)


def test_a_candidate_that_changes_only_text_ties_on_the_rules_replay_and_is_not_promoted(market, scalping) -> None:
    def lesson(data: dict) -> None:
        data["lessons_learned"].append({"id": "L9", "date": "2026-01-10", "lesson": "be patient", "evidence_trade_ids": [1]})

    candidate = candidate_of(scalping, lesson)
    outcome = validate(candidate, market)
    assert not outcome.promoted and outcome.verdict == Verdict.REJECTED and outcome.reason.startswith("tie"), outcome.reason
    assert playbook_current().pk == scalping.pk


def test_a_rules_candidate_is_not_promoted_automatically_when_the_analyst_is_claude_without_a_key(market, scalping,
                                                                                                   settings) -> None:
    settings.BRAIN = "claude"
    settings.ANTHROPIC_API_KEY = ""
    candidate = candidate_of(scalping, scalper_off)
    outcome = validate(candidate, market)
    assert outcome.verdict == Verdict.WAITING and "ANTHROPIC_API_KEY is unset" in outcome.reason
    assert "better out of sample" in outcome.reason  # what the rules folds said is kept in the reason
    candidate.refresh_from_db()
    assert candidate.status == PlaybookStatus.CANDIDATE and playbook_current().pk == scalping.pk


def test_a_manual_activation_during_a_running_validation_is_not_overwritten(market, scalping) -> None:
    from journal.models import JournalEvent

    candidate = candidate_of(scalping, scalper_off, "scalper off")
    # A person's own copy of the same change, activated by force while the candidate's folds replay.
    manual = candidate_of(scalping, scalper_off, "scalper off, by hand")

    def person_acts(done: int, total: int) -> None:
        if done == 1 and playbook_current().pk == scalping.pk:
            playbook_activate_forced(version=manual.version, by="alice (admin)", reason="stop the bleeding now")

    outcome = validate(candidate, market, on_fold=person_acts)
    manual.refresh_from_db()
    candidate.refresh_from_db()
    # The swap against v(scalping) found it retired: validated again against the person's version, a tie.
    assert manual.status == PlaybookStatus.ACTIVE and playbook_current().pk == manual.pk
    assert outcome.current_version == manual.version and candidate.validated_against == manual.version
    assert candidate.status == PlaybookStatus.REJECTED and outcome.reason.startswith("the trading content equals")
    assert JournalEvent.objects.filter(kind="playbook_forced_activation", data__version=manual.version).exists()


def test_an_admin_edit_trades_only_after_its_validation(market, scalping, admin_client, django_capture_on_commit_callbacks,
                                                       ) -> None:
    data = copy.deepcopy(scalping.playbook)
    scalper_off(data)
    with django_capture_on_commit_callbacks() as queued:
        response = admin_client.post(f"/admin/brain/playbookversion/{scalping.pk}/change/",
                                     {"playbook": json.dumps(data), "change_summary": "scalper off by hand"})
    assert response.status_code == 302
    edit = PlaybookVersion.objects.get(version=scalping.version + 1)
    assert edit.status == PlaybookStatus.CANDIDATE and playbook_current().pk == scalping.pk
    assert len(queued) == 1  # its validation is sent to the reflection queue after the commit
    outcome = validate(edit, market)
    assert outcome.promoted and playbook_current().pk == edit.pk
    page = admin_client.get(f"/admin/brain/playbookversion/{edit.pk}/change/").content.decode()
    assert 'id="validation-verdict"' in page and "P(candidate better)" in page and page.count("<td>1</td>") >= 1
    listing = admin_client.get("/admin/brain/playbookversion/").content.decode()
    assert "promoted: better out of sample" in listing


def test_the_admin_forced_activation_needs_a_reason_and_is_journaled_with_the_user(db, admin_client) -> None:
    from journal.models import JournalEvent

    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["time_filters"]["avoid_hours_utc"] = [13]
    v2 = playbook_save(data=data, change_summary="avoid 13 UTC", triggered_by=PlaybookTrigger.MANUAL)
    url = f"/admin/brain/playbookversion/{v2.pk}/activate/"
    refused = admin_client.post(url, {"reason": "  "})
    assert refused.status_code == 200 and "This field is required" in refused.content.decode()
    assert playbook_current().pk == v1.pk and not JournalEvent.objects.filter(kind="playbook_forced_activation").exists()
    assert admin_client.post(url, {"reason": "news at 13 UTC all week"}).status_code == 302
    v2.refresh_from_db()
    assert v2.status == PlaybookStatus.ACTIVE and v2.activated_by == "admin (admin)"
    event = JournalEvent.objects.get(kind="playbook_forced_activation")
    assert event.data == {"version": v2.version, "by": "admin (admin)", "reason": "news at 13 UTC all week", "retired": [1]}
