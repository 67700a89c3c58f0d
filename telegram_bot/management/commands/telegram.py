"""`python manage.py telegram`: the Telegram bot (commands by long polling) and the alert sender.

Starts one child, a Celery worker on the `telegram` queue (solo pool), which runs the
alert pass (`telegram_bot.tasks.alerts_dispatch`) that beat sends every
TELEGRAM_DISPATCH_SECONDS; the beat entry is enabled here and disabled on a clean stop.
The worker is restarted if it dies. `--no-worker` runs only the commands (the alerts
then need a worker on the `telegram` queue elsewhere). Ctrl-C / SIGTERM stops both.
"""
from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from telegram_bot.tasks import QUEUE


class Command(BaseCommand):
    help = "Run the Telegram bot (commands) and its alert sender until Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-worker", action="store_true", help="do not start the alert worker (telegram queue)")
        parser.add_argument("--poll-timeout", type=float, default=10.0, help="getUpdates long-poll seconds")

    def handle(self, *args: Any, **opts: Any) -> None:
        from telegram_bot.bot import CommandRunner, bot_application
        from telegram_bot.services import telegram_beat_sync
        from tradebot.controls import broker_dirs_ensure

        if not settings.TELEGRAM_BOT_TOKEN:
            raise CommandError("TELEGRAM_BOT_TOKEN is not set (see .env.example)")
        chats = len(set(settings.TELEGRAM_CHAT_IDS) | set(settings.TELEGRAM_ADMIN_CHAT_IDS))
        if not chats:
            self.stderr.write("no TELEGRAM_CHAT_IDS / TELEGRAM_ADMIN_CHAT_IDS: nobody gets answers or alerts")
        broker_dirs_ensure()
        worker: dict[str, subprocess.Popen[bytes]] = {}
        stop = threading.Event()
        if not opts["no_worker"]:
            telegram_beat_sync(enabled=True)
            cmd = [sys.executable, "-m", "celery", "-A", "tradebot", "worker", "-Q", QUEUE, "-P", "solo",
                   "-n", "telegram@%h", "-l", "INFO"]
            worker["proc"] = subprocess.Popen(cmd, cwd=settings.BASE_DIR)

            def watch() -> None:
                while not stop.wait(2):
                    if worker["proc"].poll() is not None:
                        self.stderr.write(f"telegram worker exited with {worker['proc'].returncode}; restarting")
                        worker["proc"] = subprocess.Popen(cmd, cwd=settings.BASE_DIR)

            threading.Thread(target=watch, daemon=True).start()
        runner = CommandRunner()
        self.stdout.write(f"telegram: polling for commands, {chats} chat(s) configured, alerts every "
                          f"{settings.TELEGRAM_DISPATCH_SECONDS}s" + (" (no worker here)" if opts["no_worker"] else ""))
        try:
            bot_application(runner=runner, poll_timeout=opts["poll_timeout"]).run_polling(
                timeout=int(opts["poll_timeout"]), close_loop=False)
        except Exception as exc:
            # python-telegram-bot quotes the token in some errors ("The token `...` was rejected by the
            # server."): a traceback would print it. One clear line instead, the token taken out.
            from telegram import error as tg

            from telegram_bot.sender import safe_text

            hint = " (check TELEGRAM_BOT_TOKEN)" if isinstance(exc, tg.InvalidToken) else ""
            raise CommandError(safe_text(f"Telegram bot stopped: {type(exc).__name__}: {exc}{hint}")) from None
        finally:
            stop.set()
            runner.close()
            proc = worker.get("proc")
            if proc is not None:
                telegram_beat_sync(enabled=False)
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
            self.stdout.write("telegram: stopped")
