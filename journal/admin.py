"""The journal in the admin: what a trader browses to see what the bot did and why.

Rows are the record: audit fields are read-only, JSON is shown pretty-printed,
and each cycle links to its decision, orders, trades, screener log and LLM
calls. (Orders belong to execution; they are linked by URL, since the journal
app does not import execution.)
"""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.db.models import Count, Q, Sum
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from journal.models import (
    Cycle,
    JournalEvent,
    LlmCall,
    PerformanceSnapshot,
    ReflectionLog,
    RiskRejection,
    ScreenerLog,
    Trade,
)


def pretty_json(value: Any) -> SafeString:
    if value in (None, "", {}, []):
        return mark_safe("<span>-</span>")  # noqa: S308 - a constant
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return format_html('<pre style="white-space: pre-wrap; max-width: 70em; margin: 0">{}</pre>', text)


def at_tick(value: Decimal | None, tick: Decimal | None) -> str:
    """A price at its instrument's precision (tick size 0.1 -> one decimal), not the column's 10 decimals."""
    if value is None:
        return "-"
    if tick is None or not tick:
        return f"{value.normalize():f}"
    places = max(0, -tick.normalize().as_tuple().exponent)
    return f"{value.quantize(Decimal(1).scaleb(-places)):f}"


def money(value: Decimal | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def admin_link(model: str, pk: Any, label: str | None = None) -> SafeString:
    if pk in (None, ""):
        return mark_safe("-")  # noqa: S308 - a constant
    try:
        url = reverse(f"admin:{model.replace('.', '_')}_change", args=[pk])
    except NoReverseMatch:
        return format_html("{}", label or pk)
    return format_html('<a href="{}">{}</a>', url, label or pk)


def changelist_link(model: str, query: str, label: str) -> SafeString:
    try:
        url = reverse(f"admin:{model.replace('.', '_')}_changelist")
    except NoReverseMatch:
        return format_html("{}", label)
    return format_html('<a href="{}?{}">{}</a>', url, query, label)


class ReadOnlyJournalAdmin(admin.ModelAdmin):
    """The journal is written by the bot; people read it (and may delete replay runs)."""

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class TradeInline(admin.TabularInline):
    model = Trade
    fields = ("link", "direction", "status", "entry", "exit", "net_pnl", "exit_reason")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    @admin.display(description="trade")
    def link(self, obj: Trade) -> SafeString:
        return admin_link("journal.trade", obj.pk, f"trade {obj.pk}")

    @admin.display(description="entry")
    def entry(self, obj: Trade) -> str:
        return at_tick(obj.entry_price, obj.instrument.tick_sz)

    @admin.display(description="exit")
    def exit(self, obj: Trade) -> str:
        return at_tick(obj.exit_price, obj.instrument.tick_sz)

    @admin.display(description="PnL (USDT)")
    def net_pnl(self, obj: Trade) -> str:
        return money(obj.pnl_usd)

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Cycle)
class CycleAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "instrument", "as_of", "state", "outcome", "action", "brain", "mode", "run_id", "total_ms")
    list_filter = ("state", "outcome", "mode", "instrument", "brain", ("as_of", admin.DateFieldListFilter))
    search_fields = ("=id", "instrument__inst_id", "reason", "run_id", "client_order_id", "error")
    date_hierarchy = "as_of"
    list_select_related = ("instrument",)
    inlines = (TradeInline,)
    fields = (
        "instrument", "mode", "run_id", "as_of", "started_at", "ended_at", "state", "outcome", "reason", "error",
        "brain", "playbook_version", "links", "stage_times_pretty", "screener_pretty", "research_pretty",
        "decision_pretty", "risk_pretty", "order_pretty", "snapshot_pretty",
    )
    readonly_fields = fields

    @admin.display(description="action")
    def action(self, obj: Cycle) -> str:
        return ((obj.decision or {}).get("decision") or {}).get("action", "")

    @admin.display(description="ms")
    def total_ms(self, obj: Cycle) -> str:
        total = sum(float(v.get("duration_ms", 0)) for v in (obj.stage_times or {}).values() if isinstance(v, dict))
        return f"{total:.0f}"

    @admin.display(description="links")
    def links(self, obj: Cycle) -> SafeString:
        parts = [
            changelist_link("execution.order", f"cycle__id__exact={obj.pk}", "orders"),
            changelist_link("journal.trade", f"cycle__id__exact={obj.pk}", "trades"),
            changelist_link("journal.screenerlog", f"cycle__id__exact={obj.pk}", "screener log"),
            changelist_link("journal.llmcall", f"cycle__id__exact={obj.pk}", "LLM calls"),
            changelist_link("journal.riskrejection", f"cycle__id__exact={obj.pk}", "risk rejections"),
            changelist_link("journal.journalevent", f"cycle__id__exact={obj.pk}", "events"),
        ]
        return format_html_join(" · ", "{}", ((p,) for p in parts))

    @admin.display(description="stage times")
    def stage_times_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.stage_times)

    @admin.display(description="screener")
    def screener_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.screener_result)

    @admin.display(description="research")
    def research_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.research)

    @admin.display(description="decision")
    def decision_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.decision)

    @admin.display(description="risk verdict")
    def risk_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.risk_verdict)

    @admin.display(description="order")
    def order_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.order)

    @admin.display(description="snapshot")
    def snapshot_pretty(self, obj: Cycle) -> SafeString:
        return pretty_json(obj.snapshot)


@admin.register(Trade)
class TradeAdmin(ReadOnlyJournalAdmin):
    # PnL right after the side and status, prices at the instrument's precision: the list fits a laptop's
    # screen without a horizontal scroll (the regime stays a filter); totals of the filtered rows above it.
    list_display = ("id", "instrument", "direction", "status", "net_pnl", "entry", "exit", "opened_at", "closed_at",
                    "strategy_used", "exit_reason", "mode", "run_id")
    list_filter = ("status", "direction", "mode", "instrument", "strategy_used", "market_regime", "exit_reason",
                   ("opened_at", admin.DateFieldListFilter), ("closed_at", admin.DateFieldListFilter))
    search_fields = ("=id", "instrument__inst_id", "strategy_used", "reasoning", "client_order_id", "okx_order_id", "run_id")
    date_hierarchy = "opened_at"
    list_select_related = ("instrument",)
    exclude = ("indicators_entry", "indicators_exit", "research_context", "self_review")
    readonly_fields = ("cycle_link", "order_link", "indicators_entry_pretty", "indicators_exit_pretty",
                       "research_pretty", "self_review_pretty")

    # Shown through the methods below (at the instrument's precision, money with 2 decimals), in their place.
    PRICE_FIELDS = {"entry_price": "entry", "exit_price": "exit", "stop_loss": "sl", "take_profit": "tp",
                    "pnl_usd": "net_pnl"}

    def get_exclude(self, request: Any, obj: Any = None) -> tuple[str, ...]:
        return (*self.exclude, *self.PRICE_FIELDS)

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        names = [self.PRICE_FIELDS.get(f.name, f.name) for f in Trade._meta.fields if f.name not in self.exclude]
        return names + list(self.readonly_fields)

    def changelist_view(self, request: Any, extra_context: dict[str, Any] | None = None) -> Any:
        # Totals of the rows the list's filters select (every page of them), in one aggregate query.
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context is not None and "cl" in context:
            context["trade_totals"] = trade_totals(context["cl"].queryset)
        return response

    @admin.display(description="PnL (USDT)", ordering="pnl_usd")
    def net_pnl(self, obj: Trade) -> str:
        return money(obj.pnl_usd)

    @admin.display(description="entry", ordering="entry_price")
    def entry(self, obj: Trade) -> str:
        return at_tick(obj.entry_price, obj.instrument.tick_sz)

    @admin.display(description="exit", ordering="exit_price")
    def exit(self, obj: Trade) -> str:
        return at_tick(obj.exit_price, obj.instrument.tick_sz)

    @admin.display(description="stop loss")
    def sl(self, obj: Trade) -> str:
        return at_tick(obj.stop_loss, obj.instrument.tick_sz)

    @admin.display(description="take profit")
    def tp(self, obj: Trade) -> str:
        return at_tick(obj.take_profit, obj.instrument.tick_sz)

    @admin.display(description="cycle")
    def cycle_link(self, obj: Trade) -> SafeString:
        return admin_link("journal.cycle", obj.cycle_id, f"cycle {obj.cycle_id}")

    @admin.display(description="orders")
    def order_link(self, obj: Trade) -> SafeString:
        if not obj.client_order_id:
            return mark_safe("-")  # noqa: S308 - a constant
        return changelist_link("execution.order", f"q={obj.client_order_id}", obj.client_order_id)

    @admin.display(description="indicators at entry")
    def indicators_entry_pretty(self, obj: Trade) -> SafeString:
        return pretty_json(obj.indicators_entry)

    @admin.display(description="indicators at exit")
    def indicators_exit_pretty(self, obj: Trade) -> SafeString:
        return pretty_json(obj.indicators_exit)

    @admin.display(description="research context")
    def research_pretty(self, obj: Trade) -> SafeString:
        return pretty_json(obj.research_context)

    @admin.display(description="self review")
    def self_review_pretty(self, obj: Trade) -> SafeString:
        return pretty_json(obj.self_review)


def trade_totals(rows: Any) -> dict[str, Any]:
    """Count, closed, wins, net PnL, fees and funding of a trade queryset (one query), and the win rate."""
    totals = rows.order_by().aggregate(
        trades=Count("id"), closed=Count("id", filter=Q(status="closed")),
        wins=Count("id", filter=Q(status="closed", pnl_usd__gt=0)), pnl=Sum("pnl_usd"), fees=Sum("fees_usd"),
        funding=Sum("funding_usd"))
    totals["win_rate"] = f"{100 * totals['wins'] / totals['closed']:.1f}%" if totals["closed"] else "-"
    for key in ("pnl", "fees", "funding"):
        totals[key] = money(totals[key] or Decimal(0))
    return totals


@admin.register(ScreenerLog)
class ScreenerLogAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "instrument", "created_at", "signal", "bypassed", "analyst_action", "analyst_agreed", "model", "cost_usd", "mode")
    list_filter = ("signal", "bypassed", "analyst_agreed", "mode", "instrument", "model", ("created_at", admin.DateFieldListFilter))
    search_fields = ("instrument__inst_id", "reason", "bypass_reason", "=cycle__id")
    date_hierarchy = "created_at"
    list_select_related = ("instrument",)
    exclude = ("snapshot_json",)
    readonly_fields = ("snapshot_pretty", "cycle_link")

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in ScreenerLog._meta.fields if f.name != "snapshot_json"] + list(self.readonly_fields)

    def changelist_view(self, request: Any, extra_context: dict[str, Any] | None = None) -> Any:
        # The accuracy summary above the list follows the list's filters (mode, dates, instrument).
        from journal.selectors import screener_accuracy

        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context is not None and "cl" in context:
            context["screener_accuracy"] = screener_accuracy(rows=context["cl"].queryset).lines()
        return response

    @admin.display(description="cycle")
    def cycle_link(self, obj: ScreenerLog) -> SafeString:
        return admin_link("journal.cycle", obj.cycle_id, f"cycle {obj.cycle_id}")

    @admin.display(description="snapshot")
    def snapshot_pretty(self, obj: ScreenerLog) -> SafeString:
        return pretty_json(obj.snapshot_json)


@admin.register(RiskRejection)
class RiskRejectionAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "instrument", "created_at", "rules", "mode")
    list_filter = ("mode", "instrument", ("created_at", admin.DateFieldListFilter))
    search_fields = ("instrument__inst_id", "=cycle__id")
    date_hierarchy = "created_at"
    exclude = ("decision_json", "failed_rules", "account_state")
    readonly_fields = ("cycle_link", "failed_pretty", "decision_pretty", "account_pretty")

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in RiskRejection._meta.fields if f.name not in self.exclude] + list(self.readonly_fields)

    @admin.display(description="failed rules")
    def rules(self, obj: RiskRejection) -> str:
        return ", ".join(str(r.get("rule", "?")) for r in obj.failed_rules or [] if isinstance(r, dict))

    @admin.display(description="cycle")
    def cycle_link(self, obj: RiskRejection) -> SafeString:
        return admin_link("journal.cycle", obj.cycle_id, f"cycle {obj.cycle_id}")

    @admin.display(description="failed rules (detail)")
    def failed_pretty(self, obj: RiskRejection) -> SafeString:
        return pretty_json(obj.failed_rules)

    @admin.display(description="decision")
    def decision_pretty(self, obj: RiskRejection) -> SafeString:
        return pretty_json(obj.decision_json)

    @admin.display(description="account")
    def account_pretty(self, obj: RiskRejection) -> SafeString:
        return pretty_json(obj.account_state)


@admin.register(LlmCall)
class LlmCallAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "created_at", "purpose", "model", "status", "input_tokens", "output_tokens", "cost_usd", "latency_ms", "mode")
    list_filter = ("purpose", "status", "model", "provider", "mode", ("created_at", admin.DateFieldListFilter))
    search_fields = ("=cycle__id", "model", "raw_answer", "parse_error")
    date_hierarchy = "created_at"
    exclude = ("prompt",)
    readonly_fields = ("prompt_pretty", "cycle_link")

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in LlmCall._meta.fields if f.name != "prompt"] + list(self.readonly_fields)

    @admin.display(description="cycle")
    def cycle_link(self, obj: LlmCall) -> SafeString:
        return admin_link("journal.cycle", obj.cycle_id, f"cycle {obj.cycle_id}")

    @admin.display(description="prompt")
    def prompt_pretty(self, obj: LlmCall) -> SafeString:
        return pretty_json(obj.prompt)


@admin.register(ReflectionLog)
class ReflectionLogAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "created_at", "reflection_type", "status", "old_version", "new_version", "mode")
    list_filter = ("reflection_type", "status", "mode", ("created_at", admin.DateFieldListFilter))
    search_fields = ("input_prompt",)
    date_hierarchy = "created_at"
    exclude = ("output_json", "playbook_changes")
    readonly_fields = ("output_pretty", "changes_pretty")

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in ReflectionLog._meta.fields if f.name not in self.exclude] + list(self.readonly_fields)

    @admin.display(description="output")
    def output_pretty(self, obj: ReflectionLog) -> SafeString:
        return pretty_json(obj.output_json)

    @admin.display(description="playbook changes")
    def changes_pretty(self, obj: ReflectionLog) -> SafeString:
        return pretty_json(obj.playbook_changes)


@admin.register(PerformanceSnapshot)
class PerformanceSnapshotAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "created_at", "snapshot_type", "equity", "total_pnl", "win_rate", "profit_factor",
                    "sharpe_ratio", "max_drawdown", "total_trades", "playbook_version", "mode")
    list_filter = ("snapshot_type", "mode", "playbook_version", ("created_at", admin.DateFieldListFilter))
    date_hierarchy = "created_at"
    exclude = ("metrics_json",)
    readonly_fields = ("metrics_pretty",)

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in PerformanceSnapshot._meta.fields if f.name != "metrics_json"] + list(self.readonly_fields)

    @admin.display(description="metrics")
    def metrics_pretty(self, obj: PerformanceSnapshot) -> SafeString:
        return pretty_json(obj.metrics_json)


@admin.register(JournalEvent)
class JournalEventAdmin(ReadOnlyJournalAdmin):
    list_display = ("id", "created_at", "level", "kind", "short_message", "instrument", "cycle_id", "mode")
    list_filter = ("level", "kind", "mode", "instrument", ("created_at", admin.DateFieldListFilter))
    search_fields = ("message", "kind", "=cycle__id")
    date_hierarchy = "created_at"
    exclude = ("data",)
    readonly_fields = ("data_pretty",)

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        return [f.name for f in JournalEvent._meta.fields if f.name != "data"] + list(self.readonly_fields)

    @admin.display(description="message")
    def short_message(self, obj: JournalEvent) -> str:
        return obj.message[:120]

    @admin.display(description="data")
    def data_pretty(self, obj: JournalEvent) -> SafeString:
        return pretty_json(obj.data)
