"""Reads for the operating pages: brain, risk, health, playbook, one cycle.

A fixed number of queries per page, aggregated in the database (grouped counts and sums) where the
journal is large (100,000 cycles), row lists always sliced.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from datetime import UTC, datetime, time as dtime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Count, Max, Min, Sum
from django.db.models.functions import Substr, TruncDay, TruncHour
from django.utils import timezone

from brain.models import PlaybookVersion
from brain.playbook import playbook_diff
from dashboard.charts import Figure, bars, line, markers, num, when
from dashboard.filters import Filters
from dashboard.selectors_trading import ZERO, cycle_urls, list_url, start_balance
from execution.models import BotState, BotStatus, Order
from execution.selectors import bot_scope
from journal.models import (
    Cycle, CycleState, LlmCall, RiskRejection, ScreenerLog, Trade, TradeStatus,
)
from market.models import Candle, Instrument


def _day_start(now: datetime) -> datetime:
    return datetime.combine(now.date(), dtime.min, tzinfo=now.tzinfo)


def _bucket(field: str, unit: str) -> Any:
    """The hour or day a row falls in, grouped by the database. On SQLite, TruncHour/TruncDay call a Python
    function per row (100,000 screener logs: seconds); there the stored UTC text ("YYYY-MM-DD HH:MM:SS")
    is cut instead, and `_bucket_iso` writes the key as the ISO time a chart draws."""
    if connection.vendor == "sqlite":
        return Substr(field, 1, 13 if unit == "hour" else 10)
    return TruncHour(field) if unit == "hour" else TruncDay(field)


def _bucket_iso(key: Any) -> str:
    """The bucket's start as ISO text in UTC (`2025-08-01T13:00:00+00:00`), from either database's key
    (string work, not strptime: a year has 8,760 hours)."""
    if isinstance(key, datetime):
        return key.astimezone(UTC).isoformat()
    return f"{key[:10]}T{key[11:13] or '00'}:00:00+00:00"


# --- brain ---------------------------------------------------------------------------------------
HOURLY_MAX_DAYS = 31  # decisions per hour up to a month (744 bars); per day beyond (a year: 365 bars)


def _decision_unit(f: Filters) -> str:
    """The decisions chart's bucket: hours for a short period, days for a long one (a bounded series)."""
    start, end = f.start, f.end
    if start is None or end is None:
        span = f.cycles().aggregate(first=Min("as_of"), last=Max("as_of"))  # two seeks in (run_id, mode, as_of)
        start, end = start or span["first"], end or span["last"]
    if start is None or end is None:
        return "hour"
    return "hour" if end - start <= timedelta(days=HOURLY_MAX_DAYS) else "day"


def brain(f: Filters) -> dict[str, Any]:
    logs = f.cycle_rows(ScreenerLog.objects.all())
    unit = _decision_unit(f)
    # One pass over the screener logs (a year's replay: 105,120, read from the screenerlog_cycle_counts index):
    # counts per time bucket, analyst action, bypass and signal, and bypass reason; the page's figures and cards
    # are summed from these groups.
    groups = list(logs.annotate(t=_bucket(f.time_field(), unit))
                  .values("t", "analyst_action", "bypassed", "signal", "bypass_reason")
                  .annotate(n=Count("id")).order_by())
    actions: dict[str, dict[str, int]] = defaultdict(dict)
    screener: Counter = Counter()
    reasons: Counter = Counter()
    for row in sorted(groups, key=lambda r: r["t"]):
        n = row["n"]
        screener[(row["bypassed"], row["signal"])] += n
        if row["bypassed"]:
            reasons[row["bypass_reason"]] += n
        if row["analyst_action"]:
            by_time = actions[row["analyst_action"]]
            key = _bucket_iso(row["t"])
            by_time[key] = by_time.get(key, 0) + n
    bypass_reasons = [{"bypass_reason": reason, "n": n}
                      for reason, n in sorted(reasons.items(), key=lambda item: (-item[1], item[0]))[:20]]
    asked = screener.get((False, True), 0) + screener.get((False, False), 0)
    calls = f.cycle_rows(LlmCall.objects.all(), instrument_field="cycle__instrument_id")
    day = _bucket(f.time_field(), "day")
    cost_rows = list(calls.annotate(d=day).values("d", "purpose", "model").annotate(usd=Sum("cost_usd"), n=Count("id"))
                     .order_by("d"))
    cost: dict[str, dict[str, Decimal]] = defaultdict(dict)
    for row in cost_rows:
        cost[f"{row['purpose']} / {row['model']}"][_bucket_iso(row["d"])] = row["usd"]
    latency = list(calls.filter(purpose="analyze").exclude(status="pending").order_by("-id")
                   .values("id", f.time_field(), "latency_ms", "cycle_id")[:500])[::-1]
    # Calls per purpose and status with their prompt tokens: one grouped query for the table and the cache share.
    by_status = list(calls.values("purpose", "status").annotate(
        n=Count("id"), inp=Sum("input_tokens"), read=Sum("cache_read_tokens"), write=Sum("cache_write_tokens"))
        .order_by())
    status = {(r["purpose"], r["status"]): r["n"] for r in by_status}
    tokens = {key: sum(r[key] or 0 for r in by_status) for key in ("inp", "read", "write")}
    prompt_tokens = tokens["inp"] + tokens["read"] + tokens["write"]
    now = timezone.now()
    from brain.budget import spent_today

    spent = spent_today(now=now)
    cycles_link = list_url("cycles", f)
    tkey = f.time_field()
    figures = [
        Figure("decisions_per_hour", f"Analyst decisions per {unit} by action",
               [bars(action, list(by_hour), list(by_hour.values())) for action, by_hour in sorted(actions.items())],
               link=cycles_link, link_label="the cycles", layout={"barmode": "stack"}),
        Figure("bypass_reasons", "Screener bypasses by reason",
               [bars("bypasses", [r["bypass_reason"][:40] or "?" for r in bypass_reasons], [r["n"] for r in bypass_reasons])],
               link=cycles_link, link_label="the cycles"),
        Figure("analyst_latency", "Analyst latency (last 500 calls)",
               [markers("latency ms", [when(r[tkey]) for r in latency], [r["latency_ms"] for r in latency], size=5,
                        links=cycle_urls([r["cycle_id"] for r in latency]))],
               link="/admin/journal/llmcall/?purpose__exact=analyze", link_label="LLM calls in the admin"),
        Figure("llm_cost_per_day", "LLM cost per day by purpose and model (USD)",
               [bars(name, list(days), [num(v) for v in days.values()]) for name, days in sorted(cost.items())],
               link="/admin/journal/llmcall/", link_label="LLM calls in the admin", layout={"barmode": "stack"}),
    ]
    held = sum(status.get(("analyze", s), 0) for s in ("timeout", "error", "skipped"))
    return {
        "figures": figures,
        "screener": {"asked": asked, "passed": screener.get((False, True), 0),
                     "pass_rate": Decimal(screener.get((False, True), 0)) / asked if asked else None,
                     "bypassed": screener.get((True, True), 0) + screener.get((True, False), 0)},
        "bypass_reasons": bypass_reasons,
        "budget": {"spent": spent, "limit": Decimal(settings.LLM_DAILY_BUDGET_USD),
                   "share": spent / Decimal(settings.LLM_DAILY_BUDGET_USD) if settings.LLM_DAILY_BUDGET_USD else None},
        "cache_hit_share": Decimal(tokens["read"]) / prompt_tokens if prompt_tokens else None,
        "invalid": sum(n for (purpose, s), n in status.items() if s == "invalid"),
        "hold_by_default": held,
        "status": sorted(status.items()),
    }


# --- risk ----------------------------------------------------------------------------------------
def risk(f: Filters) -> dict[str, Any]:
    scope = bot_scope(mode=f.mode, run_id=f.run_id)
    bot = BotState.objects.filter(scope=scope).first() or BotState(scope=scope)
    # Sums in the database (5,000 closed trades are not read to add them up).
    closed = f.trades(Trade.objects.filter(status=TradeStatus.CLOSED, pnl_usd__isnull=False), time_field="closed_at")
    totals = closed.aggregate(pnl=Sum("pnl_usd"), last=Max("closed_at"))
    equity = start_balance() + (totals["pnl"] or ZERO)
    now = timezone.now()
    today = _day_start(totals["last"] if f.virtual_clock and totals["last"] else now)
    today_pnl = closed.filter(closed_at__gte=today).aggregate(v=Sum("pnl_usd"))["v"] or ZERO
    day_start = bot.day_start_equity or (equity - today_pnl)
    peak = max(bot.peak_equity or ZERO, equity)
    open_trades = list(f.trades(Trade.objects.filter(status=TradeStatus.OPEN))
                       .values_list("size", "entry_price", "instrument__ct_val")[:500])
    exposure = sum((size * entry * ct for size, entry, ct in open_trades), ZERO)
    rejections = f.cycle_rows(RiskRejection.objects.all())
    tkey = f.time_field()
    by_day: dict[str, Counter] = defaultdict(Counter)
    for at, failed in rejections.values_list(tkey, "failed_rules").order_by(tkey)[:20000]:
        for failure in failed or []:
            by_day[str(failure.get("rule", "?"))][at.date().isoformat()] += 1
    latest = list(rejections.select_related("instrument", "cycle").order_by("-id")[:20])
    link = "/admin/journal/riskrejection/"
    figures = [
        Figure("rejections_by_rule", "Risk rejections by rule per day",
               [bars(rule, list(days), list(days.values())) for rule, days in sorted(by_day.items())],
               link=link, link_label="rejections in the admin", layout={"barmode": "stack"}),
        Figure("daily_loss", "Today's loss against the daily limit (USD)",
               [bars("today's PnL", ["today"], [num(today_pnl)]),
                bars("limit", ["today"], [-num(day_start * Decimal(settings.MAX_DAILY_LOSS_PCT))])],
               link=list_url("trades", f, status="closed"), link_label="the closed trades"),
    ]
    dd = (peak - equity) / peak if peak else ZERO
    return {
        "figures": figures, "bot": bot, "equity": equity, "today_pnl": today_pnl,
        "daily_limit": day_start * Decimal(settings.MAX_DAILY_LOSS_PCT), "peak": peak, "drawdown": dd,
        "drawdown_limit": Decimal(settings.MAX_DRAWDOWN_PCT), "exposure": exposure,
        "exposure_share": exposure / equity if equity else None, "exposure_limit": Decimal(settings.MAX_TOTAL_EXPOSURE_PCT),
        "open_positions": len(open_trades), "max_positions": settings.MAX_CONCURRENT_POSITIONS,
        "loss_streak": bot.consecutive_losses, "loss_streak_limit": settings.MAX_CONSECUTIVE_LOSSES, "latest": latest,
    }


# --- health --------------------------------------------------------------------------------------
def workers_alive(timeout: float) -> dict[str, Any]:
    """Celery ping: which workers answer, and the queues each consumes (None when the broker is down)."""
    from tradebot.celery import app

    try:
        inspect = app.control.inspect(timeout=timeout)
        queues = inspect.active_queues() or {}
    except Exception as exc:  # noqa: BLE001 - the page must show a dead broker, not fail on it
        return {"error": f"{type(exc).__name__}: {exc}", "workers": {}}
    return {"error": "", "workers": {name: sorted(q["name"] for q in qs) for name, qs in queues.items()}}


def database_size() -> int | None:
    db = settings.DATABASES["default"]
    if db["ENGINE"].endswith("sqlite3"):
        name = str(db["NAME"])
        return sum(os.path.getsize(p) for p in (name, f"{name}-wal") if os.path.exists(p)) if name != ":memory:" else None
    with connection.cursor() as cur:
        cur.execute("SELECT pg_database_size(current_database())")
        return int(cur.fetchone()[0])


def health(f: Filters, *, ping_timeout: float) -> dict[str, Any]:
    from django_celery_beat.models import PeriodicTask

    from tradebot.celery import QUEUES
    from tradebot.controls import queue_depths

    scope = bot_scope(mode=f.mode, run_id=f.run_id)
    bot = BotState.objects.filter(scope=scope).first() or BotState(scope=scope)
    cycles = f.cycles()
    last_ids = list(cycles.values("instrument_id").annotate(last=Max("id")).values_list("last", flat=True))
    now = timezone.now()
    last_cycles = list(Cycle.objects.filter(pk__in=last_ids).select_related("instrument").order_by("instrument__inst_id")
                       .only("id", "as_of", "started_at", "state", "outcome", "reason", "instrument__inst_id"))
    states = dict(cycles.filter(state__in=[CycleState.SKIPPED, CycleState.FAILED, CycleState.INTERRUPTED])
                  .values("state").annotate(n=Count("id")).values_list("state", "n"))
    recent_bad = list(cycles.filter(state__in=[CycleState.SKIPPED, CycleState.FAILED]).select_related("instrument")
                      .order_by("-id").only("id", "as_of", "state", "reason", "instrument__inst_id")[:10])
    freshness = list(Candle.objects.values("instrument__inst_id", "timeframe").annotate(last=Max("ts"))
                     .order_by("instrument__inst_id", "timeframe"))
    beat = PeriodicTask.objects.aggregate(last=Max("last_run_at"))["last"]
    alive = workers_alive(ping_timeout)
    consumers = {q: [w for w, qs in alive["workers"].items() if q in qs] for q in QUEUES}
    return {
        "bot": bot, "last_cycles": [{"cycle": c, "age": now - c.started_at} for c in last_cycles],
        "states": states, "recent_bad": recent_bad, "queues": queue_depths(), "workers": alive,
        "consumers": consumers, "beat_last": beat, "beat_age": (now - beat) if beat else None,
        "freshness": [{**row, "age": now - row["last"]} for row in freshness], "db_size": database_size(),
    }


# --- playbook ------------------------------------------------------------------------------------
def playbook(f: Filters) -> dict[str, Any]:
    versions = list(PlaybookVersion.objects.filter(run_id="").order_by("version"))  # a replay --learn run's: its own
    by_number = {v.version: v for v in versions}
    timeline = []
    cited: set[int] = set()
    for v in versions:
        parent = by_number.get(v.parent_version) if v.parent_version is not None else None
        lessons = (v.playbook or {}).get("lessons_learned") or []
        for lesson in lessons:
            cited.update(int(t) for t in lesson.get("evidence_trade_ids") or [])
        timeline.append({"v": v, "diff": playbook_diff(parent, v) if parent else [], "lessons": lessons})
    known = set(Trade.objects.filter(pk__in=cited).values_list("pk", flat=True)) if cited else set()
    colors = {"active": "#2ca02c", "candidate": "#ff7f0e", "rejected": "#d62728", "retired": "#7f7f7f"}
    figure = Figure("playbook_timeline", "Playbook versions",
                    [markers(status, [when(v.created_at) for v in versions if v.status == status],
                             [v.version for v in versions if v.status == status], color=color, size=12,
                             links=[f"#v{v.version}" for v in versions if v.status == status])
                     for status, color in colors.items()],
                    link="/admin/brain/playbookversion/", link_label="versions in the admin",
                    layout={"yaxis": {"title": {"text": "version"}, "dtick": 1}})
    return {"timeline": timeline[::-1], "figures": [figure], "known_trades": known}


# --- one cycle -----------------------------------------------------------------------------------
def cycle_page(cycle: Cycle) -> dict[str, Any]:
    snapshot = cycle.snapshot or {}
    timeframes = snapshot.get("timeframes") or {}
    names: list[str] = []
    for view in timeframes.values():
        for key, value in (view.get("indicators") or {}).items():
            if key not in names and not isinstance(value, (list, dict)):
                names.append(key)
    indicators = [{"name": n, "values": [(timeframes[tf].get("indicators") or {}).get(n) for tf in timeframes]}
                  for n in names]
    levels = {tf: {k: (v.get("indicators") or {}).get(k) for k in ("support", "resistance")} for tf, v in timeframes.items()}
    stages = []
    for stage, info in (cycle.stage_times or {}).items():
        if isinstance(info, dict):
            stages.append({"stage": stage, **info})
    from tradebot.stages import STAGES

    queues = {s: q for s, _, q in STAGES}
    for s in stages:
        s["queue"] = queues.get(s["stage"], "")
    decision = cycle.decision or {}
    verdict = cycle.risk_verdict or {}
    return {
        "snapshot": snapshot, "timeframes": list(timeframes), "indicators": indicators, "levels": levels,
        "stages": stages, "decision": decision, "verdict": verdict,
        "screener_logs": list(cycle.screener_logs.all()[:5]),
        "llm_calls": list(cycle.llm_calls.order_by("id").only("id", "purpose", "model", "status", "latency_ms",
                                                             "cost_usd", "input_tokens", "output_tokens")[:20]),
        "rejections": list(cycle.risk_rejections.all()[:5]),
        "orders": list(Order.objects.filter(cycle=cycle).order_by("id")[:10]),
        "trades": list(Trade.objects.filter(cycle=cycle).order_by("id")[:10]),
        "events": list(cycle.events.order_by("id")[:20]),
        "halted": BotStatus,
    }
