"""`python manage.py telegram` as a real process against the local Bot API server: it answers, stops cleanly on
Ctrl-C, and its output never carries the token, not even when Telegram rejects it (python-telegram-bot's own
error quotes it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.fakes.telegram_server import TOKEN, FakeTelegram
from tests.telegram_bot.conftest import READER

ROOT = Path(__file__).resolve().parents[2]


def telegram_env(tmp: Path, base_url: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"TELEGRAM_BOT_TOKEN": token, "TELEGRAM_BASE_URL": base_url, "TELEGRAM_CHAT_IDS": str(READER),
                "TRADEBOT_VAR_DIR": str(tmp), "DJANGO_SETTINGS_MODULE": "tradebot.settings", "LOG_LEVEL": "DEBUG",
                "PYTHONUNBUFFERED": "1"})
    return env


def test_a_rejected_token_stops_it_with_one_clear_error_and_the_token_in_no_output(tmp_path: Path) -> None:
    wrong = "7012345678:AAWrong-token_never-to-be-printed-Zq"
    with FakeTelegram() as server:  # serves TOKEN only: another token gets the Bot API's 404, as Telegram answers
        done = subprocess.run([sys.executable, "manage.py", "telegram", "--no-worker"], cwd=ROOT, timeout=120,
                              env=telegram_env(tmp_path, server.base_url, wrong), capture_output=True, text=True)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert ("CommandError: Telegram bot stopped: InvalidToken: The token `[REDACTED]` was rejected by the server. "
            "(check TELEGRAM_BOT_TOKEN)") in out
    assert wrong.lower() not in out.lower() and wrong.split(":")[1].lower() not in out.lower()


def test_it_answers_by_long_polling_and_stops_on_ctrl_c_with_the_token_in_no_output(tmp_path: Path) -> None:
    with FakeTelegram() as server:
        log = tmp_path / "telegram.out"
        with open(log, "wb") as sink:
            proc = subprocess.Popen([sys.executable, "manage.py", "telegram", "--no-worker", "--poll-timeout", "1"],
                                    cwd=ROOT, env=telegram_env(tmp_path, server.base_url, TOKEN), stdout=sink,
                                    stderr=subprocess.STDOUT)
            try:
                server.push_message(chat_id=READER, text="/help")
                [reply] = server.wait_sent(1, timeout=60)
                assert reply["chat_id"] == READER and reply["text"].startswith("Commands:\n/status")
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    out = log.read_text(errors="replace")
    assert "telegram: polling for commands" in out and "telegram: stopped" in out
    assert "getUpdates" in out  # the DEBUG log shows the polling...
    assert TOKEN.lower() not in out.lower() and TOKEN.split(":")[1].lower() not in out.lower()  # ...never the token
    assert "Traceback" not in out
