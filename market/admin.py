"""Instruments in the admin: the watchlist (which ones trade), its CSV import and export.

Instruments come from OKX (never added by hand); what a person changes here is
whether one trades: the enable/disable actions, or Import with a CSV file
(`market.watchlist.WatchlistResource`: `inst_id,enabled`). The import's
preview lists every bad row with its reason (empty, unknown, duplicate, not
live, over the limit); unlike django-import-export's default, which offers
no confirmation while any row is invalid, the good rows can then be imported
and the bad ones are left out, as `manage.py watchlist import` does.
"""
from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from import_export.admin import ImportExportModelAdmin

from market.models import Instrument
from market.watchlist import WatchlistResource, watchlist_enable


@admin.register(Instrument)
class InstrumentAdmin(ImportExportModelAdmin):
    resource_classes = [WatchlistResource]
    list_display = ("inst_id", "trading_enabled", "auto_selected", "state", "settle_ccy", "ct_val", "lot_sz",
                    "tick_sz", "max_lever", "updated_at")
    list_filter = ("trading_enabled", "auto_selected", "settle_ccy", "state")
    search_fields = ("inst_id",)
    readonly_fields = ("inst_id", "inst_type", "ct_val", "lot_sz", "min_sz", "tick_sz", "max_lever", "settle_ccy",
                       "state", "trading_enabled", "auto_selected", "updated_at")
    actions = ("enable", "disable")

    def has_add_permission(self, request: Any) -> bool:
        return False  # instruments are synced from OKX

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False  # its candles and journal rows hang on it: turn it off instead

    @admin.action(description="Trade the selected instruments (add to the watchlist)")
    def enable(self, request: Any, queryset: Any) -> None:
        self._switch(request, queryset, enabled=True)

    @admin.action(description="Stop trading the selected instruments (remove from the watchlist)")
    def disable(self, request: Any, queryset: Any) -> None:
        self._switch(request, queryset, enabled=False)

    def _switch(self, request: Any, queryset: Any, *, enabled: bool) -> None:
        changed, refusal = watchlist_enable(inst_ids=queryset.values_list("inst_id", flat=True), enabled=enabled)
        if refusal:
            self.message_user(request, f"nothing changed: {refusal}", messages.ERROR)
        else:
            word = "now trade" if enabled else "no longer trade"
            self.message_user(request, f"{len(changed)} instrument(s) {word}: {', '.join(changed) or '-'}")

    def import_action(self, request: Any, **kwargs: Any) -> Any:
        """The preview; with bad rows but no hard error, the confirmation imports the good rows only."""
        response = super().import_action(request, **kwargs)
        context = getattr(response, "context_data", None)
        result = (context or {}).get("result")
        if result is not None and "confirm_form" not in context and not result.has_errors() \
                and result.has_validation_errors():
            good = sum(1 for row in result.rows if row.import_type in ("new", "update"))
            if good:
                context["confirm_form"] = self.create_confirm_form(request, import_form=context["form"])
                self.message_user(request, f"{len(result.invalid_rows)} bad row(s) listed below will be left out; "
                                           f"confirm to import the {good} good one(s)", messages.WARNING)
        return response
