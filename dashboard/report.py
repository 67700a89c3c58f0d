"""Page 10, a replay run's report: the figures of `journal.report.run_report` (issue 17's report module, shared
with `manage.py replay`'s printed report) with the equity curve and the trades on the price chart."""
from __future__ import annotations

import io
import math
from typing import Any

from django.db.models import CharField, F
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Mod

from dashboard.charts import Figure, line, markers, num, when
from dashboard.filters import FilterError, Filters
from dashboard.selectors_trading import list_url, trade_url, trade_urls
from journal.models import Cycle
from journal.report import ReportError, RunReport, report_trades, run_report, trades_csv
from market.models import Candle

PRICE_POINTS = 3000  # the price line is thinned to about this many points (a year of 5-minute cycles is 105,120)
TABLE_TRADES = 200  # the page's trade table; every trade is in the chart, the CSV and the trades list


def report_for(f: Filters) -> RunReport:
    try:
        return run_report(mode=f.mode, run_id=f.run_id, inst_id=f.inst_id or None, since=f.start, until=f.end)
    except ReportError as exc:
        raise FilterError(str(exc)) from exc


def _price_line(f: Filters, report: RunReport) -> tuple[str, list[Any], list[float | None]]:
    """The instrument's price over the period: stored 1H candles, else the run's cycle prices, thinned."""
    inst_id = f.inst_id or (report.trades[0].inst_id if report.trades else "")
    if report.start is not None and report.end is not None and inst_id:
        candles = list(Candle.objects.filter(instrument__inst_id=inst_id, timeframe="1H", ts__gte=report.start,
                                             ts__lt=report.end).order_by("ts").values_list("ts", "close")[:20000])
        if candles:
            return f"{inst_id} 1H close", [when(t) for t, _ in candles], [num(c) for _, c in candles]
    cycles = f.cycles()
    count = cycles.count()
    stride = max(1, math.ceil(count / PRICE_POINTS))
    if stride > 1:
        cycles = cycles.annotate(keep=Mod(F("id"), stride)).filter(keep=0)
    # The time as the database's UTC text and the price as JSON text: no datetime or JSON object per point (on
    # PostgreSQL, Django's timestamp loader is Python code: ~10 us a row).
    rows = list(cycles.order_by("as_of").annotate(at=Cast("as_of", CharField()), price=KeyTextTransform("price", "snapshot"))
                .values_list("at", "price")[:PRICE_POINTS * 2])
    return (f"{inst_id or 'price'} (cycle prices)", [_iso_utc(t) for t, _ in rows],
            [float(p) if p not in (None, "") else None for _, p in rows])


def _iso_utc(text: str) -> str:
    """A UTC time as the database writes it ("2025-08-01 13:05:00" on SQLite, "2025-08-01 13:05:00+00" on
    PostgreSQL, either with a fraction of a second) as `datetime.isoformat()` writes it: 2025-08-01T13:05:00+00:00."""
    return f"{text[:10]}T{text[11:].partition('+')[0]}+00:00"


def run_page(f: Filters) -> dict[str, Any]:
    report = report_for(f)
    curve = report.equity_curve
    # Each trade's page link and times written once, shared by the three traces that draw it.
    urls = dict(zip((t.id for t in report.trades), trade_urls([t.id for t in report.trades]), strict=True))
    closed_iso = {t.id: t.closed_at.isoformat() for t in report.trades if t.closed_at is not None}
    figures = [
        Figure("equity", "Equity (realised)", [line(
            "equity", [closed_iso.get(p.trade_id) or when(p.ts) for p in curve], [float(p.equity) for p in curve],
            links=[urls.get(p.trade_id) or trade_url(p.trade_id) if p.trade_id else "" for p in curve])],
            link=list_url("trades", f, status="closed"), link_label="the closed trades"),
    ]
    name, xs, ys = _price_line(f, report)
    entries = report.trades
    exits = [t for t in report.trades if t.closed_at is not None and t.exit_price is not None]
    figures.append(Figure("price_trades", "Price with the run's entries and exits", [
        line(name, xs, ys, line={"color": "#888"}),
        markers("entries", [t.opened_at.isoformat() for t in entries], [float(t.entry_price) for t in entries],
                symbol="triangle-up", color="#1f77b4", size=10, links=[urls[t.id] for t in entries],
                text=[f"#{t.id} {t.direction} {t.strategy}" for t in entries]),
        markers("exits", [closed_iso[t.id] for t in exits], [float(t.exit_price) for t in exits],  # type: ignore[arg-type]
                symbol="x", color="#9467bd", size=10, links=[urls[t.id] for t in exits],
                text=[f"#{t.id} {t.exit_reason}" for t in exits]),
    ], link=list_url("trades", f), link_label="the trades", layout={"height": 420}))
    return {"report": report, "figures": figures, "csv_query": f.query(format="csv"),
            "table_trades": report.trades[:TABLE_TRADES], "more_trades": max(0, len(report.trades) - TABLE_TRADES),
            "trades_link": list_url("trades", f)}


def run_csv(f: Filters) -> tuple[str, int]:
    """The report's per-trade list as CSV: its trades alone (the figures are not computed for it)."""
    try:
        trades = report_trades(mode=f.mode, run_id=f.run_id, inst_id=f.inst_id or None, since=f.start, until=f.end)
    except ReportError as exc:
        raise FilterError(str(exc)) from exc
    out = io.StringIO()
    rows = trades_csv(trades, out)
    return out.getvalue(), rows
