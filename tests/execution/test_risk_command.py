"""`manage.py risk check FILE.json`: exit 0 approved, 3 rejected, 2 malformed, verdict as JSON."""
from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from tests.conftest import FIXTURES

APPROVED = FIXTURES / "execution" / "risk_check_approved.json"


def run(path: Path) -> tuple[int, str, str]:
    out, err = StringIO(), StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command("risk", "check", str(path), stdout=out, stderr=err)
    return int(exit_info.value.code), out.getvalue(), err.getvalue()


def variant(tmp_path: Path, change) -> Path:
    payload = json.loads(APPROVED.read_text())
    change(payload)
    path = tmp_path / "input.json"
    path.write_text(json.dumps(payload))
    return path


def test_the_issue_example_is_approved_and_says_correlation_was_not_checked() -> None:
    code, out, _ = run(APPROVED)
    verdict = json.loads(out)
    assert code == 0 and verdict["approved"] is True and verdict["failed_rules"] == []
    assert any(s["rule"] == "correlation" for s in verdict["skipped_rules"])


def test_a_rejection_exits_3_and_lists_every_failed_rule_with_its_reason(tmp_path: Path) -> None:
    def worse(p: dict) -> None:
        p["decision"].update(size_pct=0.2, leverage=10, stop_loss=60000)
    code, out, _ = run(variant(tmp_path, worse))
    verdict = json.loads(out)
    assert code == 3 and verdict["approved"] is False
    failed = {f["rule"]: f["reason"] for f in verdict["failed_rules"]}
    assert {"single_trade", "total_exposure", "leverage", "sl_distance"} <= set(failed)
    assert all(failed.values())


def test_the_claimed_entry_price_is_ignored(tmp_path: Path) -> None:
    code, _, _ = run(variant(tmp_path, lambda p: p["decision"].update(entry_price=1)))
    assert code == 0


def test_without_returns_the_correlation_rule_is_reported_skipped(tmp_path: Path) -> None:
    code, out, _ = run(variant(tmp_path, lambda p: p.pop("returns_1h")))
    assert code == 0
    assert {"rule": "correlation", "reason": "no 1H returns given: correlation rule skipped"} in json.loads(out)["skipped_rules"]


def test_nan_values_are_a_rejection_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "nan.json"
    path.write_text(APPROVED.read_text().replace('"equity": 10000', '"equity": NaN'))
    code, out, _ = run(path)
    assert code == 3 and json.loads(out)["approved"] is False


@pytest.mark.parametrize("text,message", [
    ("{not json", "is not valid JSON"),
    ('{"decision": {}}', 'missing "market"'),
    ('[1, 2]', "must be a JSON object"),
])
def test_malformed_input_exits_2_with_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    code, out, err = run(path)
    assert code == 2 and out == "" and message in err


@pytest.mark.parametrize("change,message", [
    (lambda p: p["decision"].update(action="BUY_ALL"), "decision.action"),
    (lambda p: p["account"].update(equity=""), "account.equity must be a number"),
    (lambda p: p["positions"][0].update(posSide="up"), "posSide"),
    (lambda p: p["bot_state"].update(state="SLEEPING"), "bot_state.state"),
])
def test_wrong_fields_exit_2_naming_the_field(tmp_path: Path, change, message: str) -> None:
    code, _, err = run(variant(tmp_path, change))
    assert code == 2 and message in err


def test_a_missing_file_exits_2(tmp_path: Path) -> None:
    code, _, err = run(tmp_path / "nope.json")
    assert code == 2 and "no such file" in err
