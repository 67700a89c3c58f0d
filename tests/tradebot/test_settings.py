from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tradebot.env import ImproperSetting, env_bool, env_decimal, env_int, env_list
from tradebot.settings import database_from_url

ROOT = Path(__file__).resolve().parents[2]


def _start_django(**env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tradebot.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); print('started')"],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DECISION_CYCLE_SECONDS", "abc"),
        ("MAX_LEVERAGE", "lots"),
        ("OKX_DEMO", "maybe"),
        ("MAX_DAILY_LOSS_PCT", "NaN"),
        ("DATABASE_URL", "mysql://root@localhost/x"),
        ("LLM_DEGRADE_MODE", "panic"),
    ],
)
def test_a_bad_setting_stops_the_start_and_names_the_setting(name: str, value: str) -> None:
    result = _start_django(**{name: value})
    assert result.returncode != 0
    assert "started" not in result.stdout
    assert name in result.stderr
    assert "ImproperSetting" in result.stderr


def test_good_defaults_start() -> None:
    result = _start_django()
    assert result.returncode == 0, result.stderr
    assert "started" in result.stdout


def test_live_trading_needs_demo_off_too() -> None:
    result = _start_django(OKX_LIVE_TRADING="true")
    assert result.returncode != 0
    assert "OKX_LIVE_TRADING" in result.stderr


def test_typed_readers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X_INT", " 42 ")
    assert env_int("X_INT", 1) == 42
    monkeypatch.setenv("X_INT", "")
    assert env_int("X_INT", 7) == 7  # empty means unset
    monkeypatch.setenv("X_INT", "5")
    with pytest.raises(ImproperSetting, match="X_INT must be at least 10"):
        env_int("X_INT", 1, minimum=10)
    monkeypatch.setenv("X_BOOL", "YES")
    assert env_bool("X_BOOL", False) is True
    monkeypatch.setenv("X_DEC", "inf")
    with pytest.raises(ImproperSetting, match="X_DEC must be a finite number"):
        env_decimal("X_DEC", "1")
    monkeypatch.setenv("X_LIST", "BTC-USDT-SWAP, ETH-USDT-SWAP,")
    assert env_list("X_LIST", []) == ["BTC-USDT-SWAP", "ETH-USDT-SWAP"]


def test_database_urls() -> None:
    sqlite, ts = database_from_url(None)
    assert sqlite["ENGINE"] == "django.db.backends.sqlite3" and ts is False
    pg, ts = database_from_url("postgres://bot:p%40ss@db.local:5433/tradebot")
    assert (pg["ENGINE"], pg["NAME"], pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"]) == (
        "django.db.backends.postgresql", "tradebot", "bot", "p@ss", "db.local", "5433")
    assert ts is False
    tsdb, ts = database_from_url("timescale://bot@db/tradebot")
    assert tsdb["ENGINE"] == "django.db.backends.postgresql" and ts is True
    with pytest.raises(ImproperSetting, match="DATABASE_URL must name a database"):
        database_from_url("postgres://bot@db")


def test_every_setting_read_from_the_environment_is_documented_in_env_example() -> None:
    import re

    source = (ROOT / "tradebot" / "settings.py").read_text()
    read = set(re.findall(r'env_(?:str|int|decimal|float|bool|list|choice|secret)\(\s*"([A-Z0-9_]+)"', source))
    read |= set(re.findall(r'os\.environ\.get\("([A-Z0-9_]+)"', source))
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert read, "no settings found: the pattern is wrong"
    assert read - documented == set(), f"settings missing from .env.example: {sorted(read - documented)}"
