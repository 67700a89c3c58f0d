"""The shipped news calendar and the versioned playbook."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from brain.admin import PlaybookVersionForm
from brain.models import NewsEvent, PlaybookStatus, PlaybookVersion
from brain.news import is_news_window, upcoming_events
from brain.playbook import (PlaybookError, playbook_current, playbook_default, playbook_promote, playbook_save,
                            playbook_transition)

pytestmark = pytest.mark.django_db
UTC = timezone.utc


@pytest.mark.parametrize("release", [
    datetime(2026, 1, 28, 19, 0, tzinfo=UTC),  # FOMC, 14:00 EST
    datetime(2026, 3, 18, 18, 0, tzinfo=UTC),  # FOMC, 14:00 EDT (DST began 8 March)
    datetime(2026, 12, 9, 19, 0, tzinfo=UTC),  # FOMC, back on EST
    datetime(2026, 1, 13, 13, 30, tzinfo=UTC),  # CPI 08:30 EST
    datetime(2026, 6, 5, 12, 30, tzinfo=UTC),  # NFP 08:30 EDT
])
def test_the_news_window_opens_30_minutes_before_a_2026_release(release):
    assert is_news_window(now=release - timedelta(minutes=29), minutes_before=30)
    assert is_news_window(now=release + timedelta(minutes=5))
    assert not is_news_window(now=release - timedelta(minutes=45), minutes_before=30)
    assert not is_news_window(now=release - timedelta(days=1))


def test_the_calendar_covers_every_fomc_meeting_and_monthly_release_of_2026():
    year = NewsEvent.objects.filter(scheduled_at__year=2026)
    assert year.filter(kind="FOMC").count() == 8
    assert year.filter(kind="CPI").count() == 12 and year.filter(kind="NFP").count() == 12
    assert year.filter(kind="GDP").count() == 4
    assert all(e.source for e in year)


def test_a_disabled_event_opens_no_window():
    release = datetime(2026, 4, 29, 18, 0, tzinfo=UTC)
    NewsEvent.objects.filter(scheduled_at=release).update(enabled=False)
    assert not is_news_window(now=release - timedelta(minutes=10))


def test_upcoming_events_for_the_prompt():
    events = upcoming_events(now=datetime(2026, 7, 29, 6, 0, tzinfo=UTC), hours=24)
    assert events == [{"name": "FOMC rate decision", "kind": "FOMC", "at_utc": "2026-07-29 18:00", "impact": "high"}]


def test_playbook_current_creates_a_valid_v1_once():
    first = playbook_current()
    assert (first.version, first.status, first.triggered_by) == (1, "active", "init")
    assert playbook_current().pk == first.pk
    assert set(first.playbook) >= {"market_regime_rules", "strategy_definitions", "lessons_learned", "confidence_calibration", "time_filters"}
    for strategy in first.playbook["strategy_definitions"].values():
        assert strategy["entry"] and strategy["params"]["stop_atr_mult"] > 0


def test_a_new_version_is_a_candidate_and_invalid_data_is_refused():
    v1 = playbook_current()
    data = playbook_default()
    data["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] = False
    v2 = playbook_save(data=data, change_summary="off", triggered_by="manual", performance={"pf": "0.5"})
    v1.refresh_from_db()
    # Only the seed starts active: a new version waits for validation (or a person's forced activation).
    assert (v2.version, v2.parent_version, v2.status, v1.status) == (2, 1, "candidate", "active")
    assert playbook_current().pk == v1.pk
    with pytest.raises(PlaybookError, match="only the seed v1 starts active"):
        playbook_save(data=data, change_summary="on", triggered_by="manual", status=PlaybookStatus.ACTIVE)
    broken = playbook_default()
    broken["strategy_definitions"]["trend_pullback"]["params"]["target_atr_mult"] = 0.5  # reward below risk
    with pytest.raises(PlaybookError, match="target_atr_mult"):
        playbook_save(data=broken, change_summary="bad", triggered_by="manual")
    with pytest.raises(PlaybookError):
        playbook_save(data=playbook_default(), change_summary="?", triggered_by="a model")
    assert PlaybookVersion.objects.count() == 2


def test_candidate_transitions_follow_the_table():
    playbook_current()
    candidate = playbook_save(data=playbook_default(), change_summary="try", triggered_by="reflection", status=PlaybookStatus.CANDIDATE)
    assert playbook_current().version == 1
    with pytest.raises(PlaybookError, match="playbook_promote"):
        playbook_transition(version=candidate, to=PlaybookStatus.ACTIVE)  # activation is validated or forced only
    assert playbook_promote(candidate=candidate, against=1, validation={"reason": "better"})
    assert playbook_current().version == 2 and PlaybookVersion.objects.get(version=1).status == "retired"
    assert candidate.activated_by == "validation" and candidate.validated_against == 1
    with pytest.raises(PlaybookError, match="not allowed"):
        playbook_transition(version=candidate, to=PlaybookStatus.REJECTED)


def test_the_admin_form_validates_playbook_edits():
    data = playbook_default()
    data["strategy_definitions"]["trend_pullback"]["params"]["leverage"] = 500
    form = PlaybookVersionForm(data={"version": 9, "playbook": __import__("json").dumps(data), "triggered_by": "manual", "status": "candidate"})
    assert not form.is_valid() and "playbook" in form.errors
    same = PlaybookVersionForm(data={"playbook": __import__("json").dumps(playbook_default()), "change_summary": "same"})
    assert not same.is_valid() and "trading content equals the active v1" in str(same.errors)  # no version without a change
    changed = playbook_default()
    changed["strategy_definitions"]["trend_pullback"]["params"]["leverage"] = 4.5
    form = PlaybookVersionForm(data={"version": 9, "playbook": __import__("json").dumps(changed), "triggered_by": "manual", "status": "candidate"})
    assert form.is_valid(), form.errors
