"""Admin views of orders, the bot's state and the paper book (read-mostly: state changes go through services)."""
from __future__ import annotations

from django.contrib import admin

from execution.models import BotState, LiveTradingConfirmation, Order, PaperFill, PaperFunding, PaperOrder, PaperPosition


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("client_order_id", "mode", "run_id", "exchange", "inst_id", "action", "side", "size", "state",
                    "avg_fill_price", "created_at")
    list_filter = ("state", "exchange", "mode", "inst_id")
    search_fields = ("client_order_id", "exchange_order_id")
    readonly_fields = [f.name for f in Order._meta.fields]


@admin.register(BotState)
class BotStateAdmin(admin.ModelAdmin):
    # scope: "live" (make run), "demo" (make demo) or "replay:<run id>": the rows are otherwise alike.
    list_display = ("scope", "state", "reason", "by", "since", "until", "consecutive_losses", "day_start_equity",
                    "peak_equity")
    list_filter = ("state",)
    search_fields = ("scope",)
    readonly_fields = [f.name for f in BotState._meta.fields]


@admin.register(LiveTradingConfirmation)
class LiveTradingConfirmationAdmin(admin.ModelAdmin):
    list_display = ("by", "confirmed_at", "note")
    readonly_fields = ("by", "confirmed_at", "note")


@admin.register(PaperPosition)
class PaperPositionAdmin(admin.ModelAdmin):
    list_display = ("account", "inst_id", "pos_side", "status", "size", "avg_px", "leverage", "margin", "realized_pnl",
                    "fees", "funding", "close_reason")
    list_filter = ("account__name", "status", "inst_id")
    list_select_related = ("account",)


for model in (PaperOrder, PaperFill, PaperFunding):
    admin.site.register(model)
