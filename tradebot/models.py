"""Admin-only proxy: the bot's state row with halt / resume / flatten actions (see tradebot/admin.py)."""
from __future__ import annotations

from execution.models import BotState


class BotControl(BotState):
    class Meta:
        proxy = True
        verbose_name = "bot control"
        verbose_name_plural = "bot controls"
