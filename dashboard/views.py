"""The cockpit's pages. Staff only; every page takes the same filter (dashboard.filters) and answers a bad
filter value with 400 and the message in the page. Controls are POST with CSRF and journaled with who."""
from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import orjson
from django.conf import settings
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import BadRequest
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils.safestring import SafeString, mark_safe
from django.views.decorators.http import require_http_methods, require_POST

from dashboard import selectors_ops as ops
from dashboard import selectors_trading as trading
from dashboard.charts import Figure
from dashboard.filters import FilterError, Filters, filters_parse
from execution.models import BotState, BotStatus
from journal.models import Cycle, Mode, Trade
from market.models import Instrument

PAGES = (("portfolio", "Portfolio"), ("positions", "Positions"), ("strategies", "Strategies"), ("brain", "Brain"),
         ("risk", "Risk"), ("health", "Health"), ("playbook", "Playbook"), ("report", "Replay report"),
         ("trades", "Trades"), ("cycles", "Cycles"), ("controls", "Controls"))
RUNS_LISTED = 50


def _runs() -> list[str]:
    # Every replay run has its own bot state row ("replay:<run id>"): a short table, unlike the cycles.
    scopes = BotState.objects.filter(scope__startswith="replay:").order_by("-id").values_list("scope", flat=True)
    return [s.removeprefix("replay:") for s in scopes[:RUNS_LISTED]]


def figures_script(figures: list[dict[str, Any]]) -> SafeString:
    """The figures as JSON for `<script type="application/json">`, as `json_script` escapes it (no `<`, `>`, `&`
    to end the script early), through orjson: 15,000 points with their links took Django's encoder ~0.2 s."""
    text = orjson.dumps(figures, default=str).decode()
    return mark_safe(text.replace("<", "\\u003C").replace(">", "\\u003E").replace("&", "\\u0026"))  # noqa: S308


def _context(request: HttpRequest, f: Filters | None, page: str, **extra: Any) -> dict[str, Any]:
    figures: list[Figure] = extra.pop("figures", [])
    # One query for the filter's instrument list and each instrument's tick size (prices at its precision).
    ticks = dict(Instrument.objects.order_by("inst_id").values_list("inst_id", "tick_sz"))
    return {
        "pages": PAGES, "page": page, "f": f or Filters(), "runs": _runs(),
        "instruments": list(ticks), "ticks": ticks,
        "figures": figures, "figures_json": figures_script([fig.as_json() for fig in figures]) if figures else "",
        **extra,
    }


def dashboard_page(page: str, template: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., HttpResponse]]:
    """A staff-only page: parse the filter, call the page's reader, render; a FilterError is a 400."""
    def wrap(reader: Callable[..., dict[str, Any]]) -> Callable[..., HttpResponse]:
        @staff_member_required
        @wraps(reader)
        def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            try:
                f = filters_parse(request.GET)
                data = reader(request, f, *args, **kwargs)
            except FilterError as exc:
                return render(request, "dashboard/bad_request.html", _context(request, None, page, error=str(exc)),
                              status=400)
            if isinstance(data, HttpResponse):
                return data
            return render(request, template, _context(request, f, page, **data))
        return view
    return wrap


@dashboard_page("portfolio", "dashboard/portfolio.html")
def portfolio(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return trading.portfolio(f)


@dashboard_page("positions", "dashboard/positions.html")
def positions(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return trading.positions(f)


@dashboard_page("strategies", "dashboard/strategies.html")
def strategies(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return trading.strategies(f)


@dashboard_page("brain", "dashboard/brain.html")
def brain(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return ops.brain(f)


@dashboard_page("risk", "dashboard/risk.html")
def risk(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return ops.risk(f)


@dashboard_page("health", "dashboard/health.html")
def health(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return ops.health(f, ping_timeout=settings.DASHBOARD_PING_TIMEOUT_SECONDS)


@dashboard_page("playbook", "dashboard/playbook.html")
def playbook(request: HttpRequest, f: Filters) -> dict[str, Any]:
    return ops.playbook(f)


@dashboard_page("cycles", "dashboard/cycle.html")
def cycle(request: HttpRequest, f: Filters, pk: int) -> dict[str, Any]:
    row = get_object_or_404(Cycle.objects.select_related("instrument"), pk=pk)
    data = ops.cycle_page(row)
    return {"cycle": row, **data, "admin_url": reverse("admin:journal_cycle_change", args=[row.pk])}


@dashboard_page("trades", "dashboard/trade.html")
def trade(request: HttpRequest, f: Filters, pk: int) -> dict[str, Any]:
    row = get_object_or_404(Trade.objects.select_related("instrument", "cycle"), pk=pk)
    data = trading.trade_page(row)
    return {"trade": row, "figures": [data.pop("figure")], **data,
            "admin_url": reverse("admin:journal_trade_change", args=[row.pk])}


LIST_LIMIT = 200


def _int_param(request: HttpRequest, name: str) -> int:
    text = request.GET.get(name) or "0"
    if not text.isdigit():
        raise FilterError(f"{name}={text!r} is not a whole number")
    return int(text)


@dashboard_page("trades", "dashboard/trades.html")
def trades(request: HttpRequest, f: Filters) -> dict[str, Any]:
    """The rows behind the trade figures: the filter plus status, strategy, regime, close day."""
    qs = f.trades(Trade.objects.all()).select_related("instrument")
    extra: dict[str, str] = {}
    for param, field in (("status", "status"), ("strategy", "strategy_used"), ("regime", "market_regime"),
                         ("exit", "exit_reason")):
        value = request.GET.get(param)
        if value:
            qs = qs.filter(**{field: value})
            extra[param] = value
    day = request.GET.get("day")
    if day:
        from dashboard.filters import _parse_day

        start = _parse_day(day, "day")
        qs = qs.filter(closed_at__gte=start, closed_at__lt=start + __import__("datetime").timedelta(days=1))
        extra["day"] = day
    offset = _int_param(request, "offset")
    rows = list(qs.order_by("-opened_at", "-id")[offset:offset + LIST_LIMIT + 1])
    more = len(rows) > LIST_LIMIT
    return {"rows": rows[:LIST_LIMIT], "offset": offset, "more": more, "extra": extra,
            "next_query": f.query(**extra, offset=str(offset + LIST_LIMIT))}


@dashboard_page("cycles", "dashboard/cycles.html")
def cycles(request: HttpRequest, f: Filters) -> dict[str, Any]:
    qs = f.cycles().select_related("instrument")
    extra: dict[str, str] = {}
    for param in ("state", "outcome"):
        value = request.GET.get(param)
        if value:
            qs = qs.filter(**{param: value})
            extra[param] = value
    offset = _int_param(request, "offset")
    rows = list(qs.order_by("-as_of", "-id").only("id", "as_of", "state", "outcome", "reason", "brain", "run_id",
                                                  "instrument__inst_id")[offset:offset + LIST_LIMIT + 1])
    return {"rows": rows[:LIST_LIMIT], "offset": offset, "more": len(rows) > LIST_LIMIT, "extra": extra,
            "next_query": f.query(**extra, offset=str(offset + LIST_LIMIT))}


# --- controls --------------------------------------------------------------------------------------
def _who(request: HttpRequest) -> str:
    return f"dashboard:{request.user.get_username()}"


@staff_member_required
@require_http_methods(["GET", "POST"])
def controls(request: HttpRequest) -> HttpResponse:
    from execution.selectors import bot_state_row

    bot = bot_state_row()
    if request.method == "POST":
        return _control(request, bot)
    return render(request, "dashboard/controls.html", _context(request, None, "controls", bot=bot, confirm_flatten=False))


def _control(request: HttpRequest, bot: BotState) -> HttpResponse:
    from execution.bot import bot_resume
    from journal.services import event_record
    from tradebot.controls import bot_halt_and_flatten

    action = request.POST.get("action", "")
    who = _who(request)
    halted = bot.state in (BotStatus.HALTED, BotStatus.EMERGENCY_HALT)
    if action == "halt":
        reason = (request.POST.get("reason") or "").strip()
        if not reason:
            messages.error(request, "a halt needs a reason (it is journaled)")
        elif halted:
            messages.warning(request, f"the bot is already {bot.state} since {bot.since:%Y-%m-%d %H:%M} UTC by {bot.by}: "
                                      f"{bot.reason}; nothing changed")
        else:
            result = bot_halt_and_flatten(reason=reason, by=who, flatten=False)
            messages.warning(request, f"bot {result['state']}: {result['reason']}")
    elif action == "flatten":
        reason = (request.POST.get("reason") or "").strip() or f"flattened from the dashboard by {request.user.get_username()}"
        if request.POST.get("confirm") != "yes":
            # The confirmation step: the same form again, saying what will happen, with confirm=yes.
            return render(request, "dashboard/controls.html",
                          _context(request, None, "controls", bot=bot, confirm_flatten=True, flatten_reason=reason))
        result = bot_halt_and_flatten(reason=reason, by=who, flatten=True)
        messages.warning(request, f"bot {result['state']}; flatten: {result.get('flatten')}")
    elif action == "resume":
        if bot.state == BotStatus.RUNNING:
            messages.info(request, "the bot is already RUNNING; nothing changed")
        else:
            view = bot_resume(by=who)
            messages.info(request, f"bot {view.state}")
    elif action == "run_cycle":
        inst = Instrument.objects.filter(inst_id=request.POST.get("inst") or "").first()
        if inst is None:
            messages.error(request, f"unknown instrument {request.POST.get('inst')!r}")
        else:
            import tradebot.tasks  # noqa: F401 - the stage tasks registered (an eager run needs them by name)
            from tradebot.pipeline import cycle_launch

            # "manual" as `manage.py bot run-cycle`: the screener is bypassed, the analyst sees the market now.
            cycle = cycle_launch(instrument=inst, trigger="manual")
            event_record(kind="dashboard_run_cycle", message=f"cycle {cycle.pk} for {inst.inst_id} started by {who}",
                         data={"by": who, "cycle_id": cycle.pk}, instrument_id=inst.pk, cycle_id=cycle.pk, mode=Mode.LIVE)
            text = (f"cycle {cycle.pk} not started: {cycle.reason}" if cycle.state == "SKIPPED"
                    else f"cycle {cycle.pk} for {inst.inst_id} sent to the workers")
            messages.info(request, text)
            return HttpResponseRedirect(reverse("dashboard:cycle", args=[cycle.pk]))
    else:
        raise BadRequest(f"unknown action {action!r}")
    return HttpResponseRedirect(reverse("dashboard:controls"))


# --- replay report -------------------------------------------------------------------------------
@dashboard_page("report", "dashboard/report.html")
def report(request: HttpRequest, f: Filters) -> dict[str, Any] | HttpResponse:
    from dashboard.report import run_csv, run_page

    if not f.run_id and not f.demo:
        return {"report": None}
    if request.GET.get("format") == "csv":
        text, _ = run_csv(f)
        response = HttpResponse(text, content_type="text/csv")
        response["Content-Disposition"] = f'attachment; filename="{f.run_id or f.mode}-trades.csv"'
        return response
    return run_page(f)
