"""`manage.py playbook show | diff | rollback | history`."""
from __future__ import annotations

import copy
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from brain.models import PlaybookStatus, PlaybookVersion
from brain.playbook import playbook_current, playbook_save


def run(*args: str) -> str:
    out = StringIO()
    call_command("playbook", *args, stdout=out)
    return out.getvalue()


def test_show_diff_and_rollback_never_rewrite_history_and_a_rollback_is_only_a_candidate(db) -> None:
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] = False
    v2 = playbook_save(data=data, change_summary="breakouts off", triggered_by="reflection")
    assert "playbook v1 (active" in run("show") and "playbook v2 (candidate" in run("show", "2")
    assert "now active WITHOUT validation" in run("activate", "2", "--force", "--reason", "breakouts bleed on news days")
    assert "playbook v2 (active" in run("show")
    assert "playbook v1 (retired" in run("show", "1")
    diff = run("diff", "1", "2")
    assert '-        "enabled": true,' in diff and '+        "enabled": false,' in diff
    assert "identical" in run("diff", "1", "1")
    assert "v3 is a candidate" in run("rollback", "1")
    v3 = PlaybookVersion.objects.get(version=3)
    assert v3.status == PlaybookStatus.CANDIDATE and v3.triggered_by == "rollback" and v3.playbook == v1.playbook
    assert "rollback to v1" in v3.change_summary
    assert [c["path"] for c in v3.changes] == ["strategy_definitions.momentum_breakout.params.enabled"]
    assert playbook_current().pk == v2.pk  # the rollback trades only after validation
    assert PlaybookVersion.objects.get(pk=v1.pk).playbook == v1.playbook
    with pytest.raises(CommandError, match="equals the active v2"):
        run("rollback", "2")  # nothing to change: no version
    history = run("history")
    assert history.count("\n") == 3
    with pytest.raises(CommandError, match="does not exist"):
        run("show", "99")


def test_a_forced_activation_needs_a_reason_records_who_and_is_journaled(db) -> None:
    from journal.models import JournalEvent

    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["time_filters"]["avoid_hours_utc"] = [13]
    v2 = playbook_save(data=data, change_summary="avoid the US open", triggered_by="manual")
    run("activate", "2", "--force", "--reason", "US open whipsaws")
    v2.refresh_from_db()
    assert v2.status == PlaybookStatus.ACTIVE and v2.activation_reason == "US open whipsaws"
    assert "manage.py playbook activate" in v2.activated_by and "@" in v2.activated_by
    event = JournalEvent.objects.get(kind="playbook_forced_activation")
    assert event.data["version"] == 2 and event.data["reason"] == "US open whipsaws" and event.data["retired"] == [1]
    assert event.data["by"] == v2.activated_by


@pytest.mark.parametrize("argv, message", [
    (["activate", "99", "--force", "--reason", "x"], "playbook version 99 does not exist"),
    (["activate", "2", "--force"], "--force needs --reason TEXT"),
    (["activate", "2", "--force", "--reason", "   "], "--force needs --reason TEXT"),
    (["activate", "2", "--reason", "why"], "activation without validation needs --force"),
])
def test_bad_activation_input_is_a_one_line_error_with_a_non_zero_exit_and_writes_nothing(db, capsys, argv, message) -> None:
    from django.core.management import ManagementUtility

    from journal.models import JournalEvent

    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["time_filters"]["avoid_hours_utc"] = [13]
    playbook_save(data=data, change_summary="avoid the US open", triggered_by="manual")
    before = list(PlaybookVersion.objects.order_by("version").values_list("version", "status", "activated_by"))
    with pytest.raises(SystemExit) as exit_:
        ManagementUtility(["manage.py", "playbook", *argv]).execute()
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert list(PlaybookVersion.objects.order_by("version").values_list("version", "status", "activated_by")) == before
    assert not JournalEvent.objects.filter(kind="playbook_forced_activation").exists()


def test_reflect_command_with_no_trades_changes_nothing(db, settings) -> None:
    settings.BRAIN = "rules"
    v1 = playbook_current()
    out = StringIO()
    call_command("reflect", "--deep", stdout=out)
    assert "no_trades" in out.getvalue()
    assert playbook_current().pk == v1.pk


def test_a_rollback_queues_its_validation_and_does_not_trade_until_that_promotes_it(db, settings,
                                                                                    django_capture_on_commit_callbacks
                                                                                    ) -> None:
    from tradebot.celery import app
    import tradebot.tasks  # noqa: F401 - registers the validation task, as a worker does

    settings.BRAIN = "rules"
    settings.MARKET_DATA_SOURCE = "okx"  # not the synthetic market: validation replays stored candles (none here)
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] = False
    v2 = playbook_save(data=data, change_summary="breakouts off", triggered_by="manual")
    run("activate", "2", "--force", "--reason", "breakouts bleed")
    with django_capture_on_commit_callbacks() as queued:
        run("rollback", "1")
    v3 = PlaybookVersion.objects.get(version=3)
    assert len(queued) == 1 and playbook_current().pk == v2.pk
    before, app.conf.task_always_eager = app.conf.task_always_eager, True
    try:
        queued[0]()  # the queued task, run as a reflection worker would
    finally:
        app.conf.task_always_eager = before
    v3.refresh_from_db()
    # Its validation ran: with no stored candles there is no evidence, so it waits; v2 keeps trading.
    assert v3.validation["verdict"] == "waiting" and v3.validation["reason"].startswith("not enough evidence")
    assert v3.status == PlaybookStatus.CANDIDATE and playbook_current().pk == v2.pk
