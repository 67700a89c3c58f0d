from __future__ import annotations

from django.apps import AppConfig


class TradebotConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "tradebot"

    def ready(self) -> None:
        from tradebot.watchlist import connect

        connect()  # a watchlist change (admin, command, top-N) re-syncs the beat entries
