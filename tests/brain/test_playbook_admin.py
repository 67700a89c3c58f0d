"""The playbook admin: a diff of two versions, and edits that become new versions (never rewrites)."""
from __future__ import annotations

import copy
import html
import json

from django.test import Client

from brain.models import PlaybookStatus, PlaybookTrigger, PlaybookVersion
from brain.playbook import playbook_current, playbook_save


def test_the_diff_page_shows_the_changed_field(admin_client: Client) -> None:
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] = False
    v2 = playbook_save(data=data, change_summary="switch breakouts off", triggered_by=PlaybookTrigger.REFLECTION,
                       status=PlaybookStatus.CANDIDATE)
    page = admin_client.get("/admin/brain/playbookversion/diff/", {"a": v1.version, "b": v2.version})
    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="playbook-diff"' in text and "switch breakouts off" in text
    diff = html.unescape(text.split('id="playbook-diff"')[1].split("</pre>")[0])
    assert '-        "enabled": true,' in diff and '+        "enabled": false,' in diff
    # The list links each version to the diff against its parent.
    assert f"?a={v1.version}&amp;b={v2.version}" in admin_client.get("/admin/brain/playbookversion/").content.decode()
    same = admin_client.get("/admin/brain/playbookversion/diff/", {"a": v1.version, "b": v1.version}).content.decode()
    assert "identical" in same


def test_an_admin_edit_is_saved_as_a_new_manual_candidate_and_the_old_one_keeps_trading(admin_client: Client) -> None:
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["trend_pullback"]["params"]["size_pct"] = 0.02
    response = admin_client.post(f"/admin/brain/playbookversion/{v1.pk}/change/",
                                 {"playbook": json.dumps(data), "change_summary": "halve pullback size"})
    assert response.status_code == 302, response.content.decode()[:2000]
    v1.refresh_from_db()
    new = PlaybookVersion.objects.get(version=v1.version + 1)
    assert new.triggered_by == PlaybookTrigger.MANUAL and new.status == PlaybookStatus.CANDIDATE
    assert new.parent_version == v1.version and new.change_summary == "halve pullback size"
    assert new.playbook["strategy_definitions"]["trend_pullback"]["params"]["size_pct"] == 0.02
    # The candidate lists the field it changes and why.
    assert [(c["path"], c["old"], c["new"], c["reason"]) for c in new.changes] == [
        ("strategy_definitions.trend_pullback.params.size_pct", 0.04, 0.02, "halve pullback size")]
    assert v1.status == PlaybookStatus.ACTIVE and playbook_current().pk == v1.pk  # trades only after validation
    assert v1.playbook["strategy_definitions"]["trend_pullback"]["params"]["size_pct"] == 0.04  # history unchanged


def test_an_invalid_admin_edit_is_refused_and_changes_nothing(admin_client: Client) -> None:
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    # A target closer than the stop: reward would not beat risk.
    data["strategy_definitions"]["trend_pullback"]["params"]["target_atr_mult"] = 1.0
    response = admin_client.post(f"/admin/brain/playbookversion/{v1.pk}/change/",
                                 {"playbook": json.dumps(data), "change_summary": "bad edit"})
    assert response.status_code == 200
    assert "invalid playbook" in response.content.decode() and "target_atr_mult must exceed stop_atr_mult" in response.content.decode()
    unchanged = admin_client.post(f"/admin/brain/playbookversion/{v1.pk}/change/",
                                  {"playbook": json.dumps(v1.playbook), "change_summary": "nothing"})
    assert "the playbook is unchanged" in unchanged.content.decode()
    assert list(PlaybookVersion.objects.values_list("version", "status")) == [(v1.version, PlaybookStatus.ACTIVE)]


def test_the_editor_shows_the_playbook_as_indented_json_and_errors_name_the_field(admin_client: Client) -> None:
    v1 = playbook_current()
    page = html.unescape(admin_client.get(f"/admin/brain/playbookversion/{v1.pk}/change/").content.decode())
    assert '{\n  "market_regime_rules": {\n    "' in page  # one key a line, not a one-line blob
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["trend_pullback"]["params"]["leverage"] = 500
    data["market_regime_rules"]["ranging"]["max_position_pct"] = "lots"
    text = html.unescape(admin_client.post(f"/admin/brain/playbookversion/{v1.pk}/change/",
                                           {"playbook": json.dumps(data), "change_summary": "x"}).content.decode())
    assert "invalid playbook: strategy_definitions.trend_pullback.params.leverage: Input should be less than or " \
           "equal to 20 (given: 500)" in text
    assert 'invalid playbook: market_regime_rules.ranging.max_position_pct: Input should be a valid number' in text
    assert "validation errors for Playbook" not in text  # not pydantic's raw report
    broken = admin_client.post(f"/admin/brain/playbookversion/{v1.pk}/change/",
                               {"playbook": '{\n  "market_regime_rules": {,\n}', "change_summary": "x"})
    assert "not valid JSON: Expecting property name enclosed in double quotes at line 2, column 27" \
           in html.unescape(broken.content.decode())
    assert list(PlaybookVersion.objects.values_list("version", flat=True)) == [v1.version]


def test_an_admin_add_is_a_candidate_whose_validation_is_queued(admin_client: Client,
                                                                 django_capture_on_commit_callbacks) -> None:
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["time_filters"]["avoid_hours_utc"] = [13, 14]
    with django_capture_on_commit_callbacks() as queued:
        response = admin_client.post("/admin/brain/playbookversion/add/",
                                     {"playbook": json.dumps(data), "change_summary": "avoid the US open"})
    assert response.status_code == 302, response.content.decode()[:2000]
    new = PlaybookVersion.objects.get(version=v1.version + 1)
    assert new.status == PlaybookStatus.CANDIDATE and new.triggered_by == PlaybookTrigger.MANUAL
    assert [c["path"] for c in new.changes] == ["time_filters.avoid_hours_utc"]
    assert len(queued) == 1 and playbook_current().pk == v1.pk  # validated before it trades
