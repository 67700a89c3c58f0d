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


def test_show_diff_and_rollback_never_rewrite_history(db) -> None:
    v1 = playbook_current()
    data = copy.deepcopy(v1.playbook)
    data["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] = False
    v2 = playbook_save(data=data, change_summary="breakouts off", triggered_by="reflection")
    assert "playbook v2 (active" in run("show")
    assert "playbook v1 (retired" in run("show", "1")
    diff = run("diff", "1", "2")
    assert '-        "enabled": true,' in diff and '+        "enabled": false,' in diff
    assert "identical" in run("diff", "1", "1")
    assert "v3 is now active" in run("rollback", "1")
    v3 = playbook_current()
    assert v3.version == 3 and v3.triggered_by == "manual" and v3.playbook == v1.playbook
    assert "rollback to v1" in v3.change_summary
    assert PlaybookVersion.objects.get(pk=v2.pk).status == PlaybookStatus.RETIRED
    assert PlaybookVersion.objects.get(pk=v1.pk).playbook == v1.playbook
    history = run("history")
    assert history.count("\n") == 3
    with pytest.raises(CommandError, match="does not exist"):
        run("show", "99")


def test_reflect_command_with_no_trades_changes_nothing(db, settings) -> None:
    settings.BRAIN = "rules"
    v1 = playbook_current()
    out = StringIO()
    call_command("reflect", "--deep", stdout=out)
    assert "no_trades" in out.getvalue()
    assert playbook_current().pk == v1.pk
