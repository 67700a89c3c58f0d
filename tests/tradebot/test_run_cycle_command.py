"""`manage.py bot run-cycle` run as a user runs it (a new process, nothing imported beforehand)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


def _cycles(db: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT state, outcome, reason FROM journal_cycle ORDER BY id").fetchall()


def test_run_cycle_runs_the_stage_tasks_and_ends_the_cycle_and_a_failed_send_leaves_no_idle_cycle(
        tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{db}", "MARKET_DATA_SOURCE": "synthetic", "LOG_LEVEL": "ERROR",
           "TRADEBOT_VAR_DIR": str(tmp_path / "var"), "DJANGO_SETTINGS_MODULE": "tradebot.settings"}
    env.pop("REDIS_URL", None)
    assert _manage("migrate", "-v0", env=env).returncode == 0
    assert _manage("backfill", "--inst", "BTC-USDT-SWAP", "--tf", "15m", "1H", "4H", "--source", "synthetic",
                   "--limit", "300", env=env).returncode == 0

    done = _manage("bot", "run-cycle", "--inst", "BTC-USDT-SWAP", env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "NotRegistered" not in done.stderr + done.stdout
    [(state, outcome, _)] = _cycles(db)
    assert state == "DONE" and outcome in ("hold", "no_signal", "traded", "rejected"), (state, outcome)
    assert done.stdout.strip().endswith(_cycles(db)[0][2])  # it prints how the cycle ended

    # The chain cannot be sent (a broker that refuses): the cycle ends FAILED with why, not IDLE for ever.
    refused = _manage("bot", "run-cycle", "--inst", "BTC-USDT-SWAP", "--via-workers",
                      env={**env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "FAILED before its first stage" in refused.stderr and "Connection refused" in refused.stderr
    state, outcome, reason = _cycles(db)[-1]
    assert (state, outcome) == ("FAILED", "error") and "Connection refused" in reason

    # ... and the next run is not blocked by it.
    again = _manage("bot", "run-cycle", "--inst", "BTC-USDT-SWAP", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [row[0] for row in _cycles(db)] == ["DONE", "FAILED", "DONE"]
