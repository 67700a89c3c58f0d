"""Reads for the trading pages: portfolio, positions, strategies, a trade, a replay run's report.

Each function runs a fixed number of queries whatever the journal holds (the tests count them) and
reads only the columns it draws (`values_list`), so 5,000 trades are a few milliseconds of Python.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Case, Count, DecimalField, F, Q, Sum, When
from django.db.models.functions import Abs
from django.urls import reverse
from django.utils import timezone

from brain.performance import (
    Breakdown, CalibrationEntry, breakdown_from_sums, confidence_bucket, sharpe_per_trade,
)
from dashboard.charts import Figure, bars, line, markers, num, when
from dashboard.filters import Filters
from execution.models import Order, PaperPrice, TERMINAL_ORDER_STATES
from journal.models import Cycle, Mode, Trade, TradeStatus
from market.models import Candle

ZERO = Decimal(0)


def _url_pattern(name: str) -> tuple[str, str]:
    # reverse() once per call of a page, not once per point: a chart of 5,000 trades linked each point to its
    # trade, and 5,000 reverse() calls were a large share of the Portfolio page's time.
    head, _, tail = reverse(name, args=[987654321]).partition("987654321")
    return head, tail


def trade_url(pk: int) -> str:
    head, tail = _url_pattern("dashboard:trade")
    return f"{head}{pk}{tail}"


def trade_urls(pks: list[int]) -> list[str]:
    head, tail = _url_pattern("dashboard:trade")
    return [f"{head}{pk}{tail}" for pk in pks]


def cycle_url(pk: int) -> str:
    head, tail = _url_pattern("dashboard:cycle")
    return f"{head}{pk}{tail}"


def cycle_urls(pks: list[int | None]) -> list[str]:
    head, tail = _url_pattern("dashboard:cycle")
    return [f"{head}{pk}{tail}" if pk else "" for pk in pks]


def start_balance() -> Decimal:
    return Decimal(settings.PAPER_START_BALANCE)


EQUITY_COLUMNS = ("id", "closed_at", "pnl_usd")


def closed_qs(f: Filters) -> Any:
    """The filter's closed trades (a QuerySet of Trade)."""
    return f.trades(Trade.objects.filter(status=TradeStatus.CLOSED, pnl_usd__isnull=False), time_field="closed_at")


def closed_trades(f: Filters, columns: tuple[str, ...] = EQUITY_COLUMNS) -> list[dict[str, Any]]:
    """The filter's closed trades in closing order, as dicts of `columns` (one query). Ask only for the
    columns a page uses: each decimal of 5,000 rows is a converter call (on SQLite most of a page's time)."""
    return list(closed_qs(f).order_by("closed_at", "id").values(*columns))


@dataclass
class EquityCurve:
    times: list[datetime]
    equity: list[Decimal]
    drawdown: list[Decimal]  # fraction below the running peak
    trade_ids: list[int]
    max_drawdown: Decimal
    max_drawdown_peak_at: datetime | None
    max_drawdown_trough_at: datetime | None


def equity_curve(rows: list[dict[str, Any]], start: Decimal) -> EquityCurve:
    equity = peak = start
    peak_at: datetime | None = None
    curve = EquityCurve([], [], [], [], ZERO, None, None)
    for row in rows:
        equity += row["pnl_usd"]
        if equity > peak:
            peak, peak_at = equity, row["closed_at"]
        dd = (peak - equity) / peak if peak > 0 else ZERO
        if dd > curve.max_drawdown:
            curve.max_drawdown, curve.max_drawdown_peak_at, curve.max_drawdown_trough_at = dd, peak_at, row["closed_at"]
        curve.times.append(row["closed_at"])
        curve.equity.append(equity)
        curve.drawdown.append(dd)
        curve.trade_ids.append(row["id"])
    return curve


def daily_pnl(rows: list[dict[str, Any]]) -> dict[date, Decimal]:
    days: dict[date, Decimal] = defaultdict(lambda: ZERO)
    for row in rows:
        days[row["closed_at"].date()] += row["pnl_usd"]
    return dict(sorted(days.items()))


def list_url(name: str, f: Filters, **extra: str) -> str:
    query = f.query(**extra)
    return reverse(f"dashboard:{name}") + (f"?{query}" if query else "")


def portfolio(f: Filters) -> dict[str, Any]:
    rows = closed_trades(f, EQUITY_COLUMNS)
    paid = closed_qs(f).aggregate(fees=Sum("fees_usd"), funding=Sum("funding_usd"))  # summed by the database
    start = start_balance()
    curve = equity_curve(rows, start)
    pnls = [r["pnl_usd"] for r in rows]
    wins = sum(1 for p in pnls if p > 0)
    days = daily_pnl(rows)
    links = trade_urls(curve.trade_ids)
    trades_link = list_url("trades", f, status="closed")
    day_links = [list_url("trades", f, status="closed", day=d.isoformat()) for d in days]
    figures = [
        Figure("equity", "Equity (start balance + closed trades' net PnL)",
               [line("equity", [when(t) for t in curve.times], [num(v) for v in curve.equity], links=links)],
               link=trades_link, link_label="the closed trades"),
        Figure("daily_pnl", "Daily PnL (net, by close day, UTC)",
               [bars("daily PnL", [d.isoformat() for d in days], [num(v) for v in days.values()], links=day_links)],
               link=trades_link, link_label="the closed trades"),
        Figure("drawdown", "Drawdown from the running peak",
               [line("drawdown", [when(t) for t in curve.times], [-num(v) for v in curve.drawdown], links=links,
                     fill="tozeroy")], link=trades_link, link_label="the closed trades",
               layout={"yaxis": {"tickformat": ".1%"}}),
    ]
    sharpe = sharpe_per_trade(pnls)
    return {
        "figures": figures,
        "totals": {
            "start_balance": start, "equity": curve.equity[-1] if curve.equity else start,
            "total_pnl": sum(pnls, ZERO), "trades": len(rows), "wins": wins,
            "win_rate": Decimal(wins) / len(rows) if rows else None, "sharpe": sharpe,
            "fees": paid["fees"] or ZERO, "funding": paid["funding"] or ZERO,
            "max_drawdown": curve.max_drawdown,
        },
    }


def last_prices(f: Filters) -> dict[str, tuple[Decimal | None, datetime | None]]:
    """The paper exchange's last price per instrument for the filter's paper account (one query)."""
    account = f.paper_account
    return {inst: (last, ts) for inst, last, ts in
            PaperPrice.objects.filter(account__name=account).values_list("inst_id", "last", "ts")}


def positions(f: Filters) -> dict[str, Any]:
    qs = f.trades(Trade.objects.filter(status=TradeStatus.OPEN)).select_related("instrument").order_by("opened_at", "id")
    trades = list(qs[:200])
    prices = last_prices(f)
    now = timezone.now()
    rows = []
    for t in trades:
        last, ts = prices.get(t.instrument.inst_id, (None, None))
        sign = 1 if t.direction == "LONG" else -1
        upl = (last - t.entry_price) * sign * t.size * t.instrument.ct_val if last is not None else None
        rows.append({
            "trade": t, "last": last, "price_at": ts, "upl": upl,
            "sl_distance": (last - t.stop_loss) * sign if last is not None else None,
            "sl_distance_pct": ((last - t.stop_loss) * sign / last) if last else None,
            "tp_distance": (t.take_profit - last) * sign if last is not None and t.take_profit is not None else None,
            "tp_distance_pct": ((t.take_profit - last) * sign / last) if last and t.take_profit is not None else None,
            # A replay's "now" is its clock (the last price's time), not the wall clock.
            "in_trade": ((ts if f.virtual_clock and ts else now) - t.opened_at),
        })
    orders = Order.objects.filter(mode=f.mode, run_id=f.run_id).exclude(state__in=TERMINAL_ORDER_STATES)
    if f.inst_id:
        orders = orders.filter(inst_id=f.inst_id)
    orders = list(orders.order_by("-created_at")[:50])
    return {"rows": rows, "orders": orders, "total_upl": sum((r["upl"] for r in rows if r["upl"] is not None), ZERO)}


def _strategy_groups(f: Filters) -> list[dict[str, Any]]:
    """The filter's closed trades counted and summed in the database per strategy, regime and stated confidence
    (a few dozen groups, whatever the trade count), with each group's sum and count of R:R (|TP - entry| /
    |entry - SL|, for trades with a take profit and a stop away from the entry)."""
    closed = closed_qs(f)
    has_rr = Q(take_profit__isnull=False) & ~Q(entry_price=F("stop_loss"))
    rr = Case(When(has_rr, then=Abs(F("take_profit") - F("entry_price")) / Abs(F("entry_price") - F("stop_loss"))),
              output_field=DecimalField(max_digits=30, decimal_places=10))
    return list(closed.order_by().values("strategy_used", "market_regime", "confidence_at_entry").annotate(
        n=Count("id"), wins=Count("id", filter=Q(pnl_usd__gt=0)), losses=Count("id", filter=Q(pnl_usd__lt=0)),
        pnl=Sum("pnl_usd"), won=Sum("pnl_usd", filter=Q(pnl_usd__gt=0)), lost=Sum("pnl_usd", filter=Q(pnl_usd__lt=0)),
        rr_sum=Sum(rr), rr_n=Count("id", filter=has_rr)))


def _breakdowns(groups: list[dict[str, Any]], key: str) -> dict[str, Breakdown]:
    sums: dict[str, list[Any]] = {}
    for g in groups:
        a = sums.setdefault(g[key] or "unknown", [0, 0, 0, ZERO, ZERO, ZERO])
        a[0] += g["n"]
        a[1] += g["wins"]
        a[2] += g["losses"]
        a[3] += g["pnl"] or ZERO
        a[4] += g["won"] or ZERO
        a[5] -= g["lost"] or ZERO
    return {name: breakdown_from_sums(trades=a[0], wins=a[1], losses=a[2], total_pnl=a[3], gross_profit=a[4],
                                      gross_loss=a[5]) for name, a in sorted(sums.items())}


def _calibration(groups: list[dict[str, Any]]) -> dict[str, CalibrationEntry]:
    sums: dict[str, list[Any]] = {}
    for g in groups:
        confidence = g["confidence_at_entry"]
        label = confidence_bucket(confidence) if confidence is not None else None
        if label is not None:
            a = sums.setdefault(label, [0, 0, ZERO])
            a[0] += g["n"]
            a[1] += g["wins"]
            a[2] += confidence * g["n"]
    result = {}
    for label, (n, wins, stated_sum) in sorted(sums.items()):
        stated, realised = stated_sum / n, Decimal(wins) / n
        result[label] = CalibrationEntry(trades=n, wins=wins, stated_confidence=stated, realised_win_rate=realised,
                                         gap=stated - realised)
    return result


def strategies(f: Filters) -> dict[str, Any]:
    # Aggregated in the database (5,000 trades were read and summarised in Python: ~0.15 s on SQLite).
    groups = _strategy_groups(f)
    by_strategy = _breakdowns(groups, "strategy_used")
    by_regime = _breakdowns(groups, "market_regime")
    rr: dict[str, list[Any]] = {}
    for g in groups:
        a = rr.setdefault(g["strategy_used"] or "unknown", [ZERO, 0])
        a[0] += g["rr_sum"] or ZERO
        a[1] += g["rr_n"]
    table = [{"strategy": name, "b": b, "avg_rr": rr[name][0] / rr[name][1] if rr[name][1] else None,
              "link": list_url("trades", f, status="closed", strategy=name)} for name, b in by_strategy.items()]
    names = list(by_strategy)
    link = list_url("trades", f, status="closed")
    strat_links = [row["link"] for row in table]
    regimes = list(by_regime)
    calib = _calibration(groups)
    figures = [
        Figure("strategy_pnl", "Net PnL by strategy",
               [bars("PnL", names, [num(b.total_pnl) for b in by_strategy.values()], links=strat_links)],
               link=link, link_label="the closed trades"),
        Figure("strategy_win_rate", "Win rate and trades by strategy",
               [bars("win rate", names, [num(b.win_rate) for b in by_strategy.values()], links=strat_links),
                bars("trades", names, [b.trades for b in by_strategy.values()], links=strat_links, yaxis="y2")],
               link=link, layout={"yaxis": {"tickformat": ".0%"}, "yaxis2": {"overlaying": "y", "side": "right"},
                                  "barmode": "group"}),
        Figure("regime_trades", "Trades and PnL by regime",
               [bars("trades", regimes, [b.trades for b in by_regime.values()],
                     links=[list_url("trades", f, status="closed", regime=r) for r in regimes]),
                bars("PnL", regimes, [num(b.total_pnl) for b in by_regime.values()], yaxis="y2",
                     links=[list_url("trades", f, status="closed", regime=r) for r in regimes])],
               link=link, layout={"yaxis2": {"overlaying": "y", "side": "right"}, "barmode": "group"}),
        Figure("calibration", "Confidence against outcome (stated vs realised win rate)",
               [line("stated", list(calib), [num(c.stated_confidence) for c in calib.values()], mode="lines+markers"),
                line("realised", list(calib), [num(c.realised_win_rate) for c in calib.values()], mode="lines+markers")],
               link=link, layout={"yaxis": {"tickformat": ".0%", "range": [0, 1]}}),
    ]
    return {"figures": figures, "table": table, "calibration": calib}


# --- one trade -----------------------------------------------------------------------------------
def trade_candles(trade: Trade, *, before: timedelta, after: timedelta) -> tuple[str, list[dict[str, Any]]]:
    """15m candles around the trade from the candle table; a replay's market may not be stored there (a
    synthetic or CSV feed), so then the candles are built from the run's cycle prices (every 5 minutes)."""
    end = (trade.closed_at or timezone.now()) + after
    start = trade.opened_at - before
    stored = list(Candle.objects.filter(instrument_id=trade.instrument_id, timeframe="15m", ts__gte=start, ts__lt=end)
                  .order_by("ts").values("ts", "open", "high", "low", "close")[:2000])
    if stored:
        return "stored 15m candles", stored
    prices = Cycle.objects.filter(instrument_id=trade.instrument_id, mode=trade.mode, run_id=trade.run_id,
                                  as_of__gte=start, as_of__lt=end).order_by("as_of").values_list("as_of", "snapshot__price")
    buckets: dict[datetime, dict[str, Any]] = {}
    for as_of, price in prices[:6000]:
        if price in (None, ""):
            continue
        p = Decimal(str(price))
        key = as_of.replace(minute=as_of.minute - as_of.minute % 15, second=0, microsecond=0)
        bar = buckets.get(key)
        if bar is None:
            buckets[key] = {"ts": key, "open": p, "high": p, "low": p, "close": p}
        else:
            bar["high"], bar["low"], bar["close"] = max(bar["high"], p), min(bar["low"], p), p
    return "15m bars from the cycles' prices (no stored candles for this market)", list(buckets.values())


def trade_page(trade: Trade) -> dict[str, Any]:
    until = trade.closed_at or timezone.now()
    span = max(until - trade.opened_at, timedelta(hours=2))
    source, candles = trade_candles(trade, before=span, after=span / 2)
    # The cycles that decided it: the opening one and every cycle of its instrument that traded while it was open.
    deciding = list(Cycle.objects.filter(instrument_id=trade.instrument_id, mode=trade.mode, run_id=trade.run_id,
                                         as_of__gte=trade.opened_at - timedelta(minutes=15), as_of__lte=until,
                                         outcome="traded").order_by("as_of")
                    .values("id", "as_of", "snapshot__price", "decision__decision__action")[:50])
    if trade.cycle_id and trade.cycle_id not in {c["id"] for c in deciding}:
        deciding.insert(0, Cycle.objects.filter(pk=trade.cycle_id).values("id", "as_of", "snapshot__price",
                                                                          "decision__decision__action").first())
    deciding = [c for c in deciding if c]
    x0, x1 = when(trade.opened_at), when(until)
    traces = [
        {"type": "candlestick", "name": trade.instrument.inst_id, "x": [when(c["ts"]) for c in candles],
         "open": [num(c["open"]) for c in candles], "high": [num(c["high"]) for c in candles],
         "low": [num(c["low"]) for c in candles], "close": [num(c["close"]) for c in candles]},
        line("entry", [x0, x1], [num(trade.entry_price)] * 2, line={"color": "#1f77b4"}),
        line("stop loss", [x0, x1], [num(trade.stop_loss)] * 2, line={"color": "#d62728", "dash": "dash"}),
    ]
    if trade.take_profit is not None:
        traces.append(line("take profit", [x0, x1], [num(trade.take_profit)] * 2, line={"color": "#2ca02c", "dash": "dash"}))
    if trade.exit_price is not None:
        traces.append(line("exit", [x0, x1], [num(trade.exit_price)] * 2, line={"color": "#9467bd", "dash": "dot"}))
    up = trade.direction == "LONG"
    traces.append(markers("entry marker", [x0], [num(trade.entry_price)], symbol="triangle-up" if up else "triangle-down",
                          color="#1f77b4", size=14, links=[cycle_url(trade.cycle_id)] if trade.cycle_id else None))
    if trade.closed_at is not None and trade.exit_price is not None:
        traces.append(markers("exit marker", [when(trade.closed_at)], [num(trade.exit_price)], symbol="x",
                              color="#9467bd", size=14))
    traces.append(markers("deciding cycles", [when(c["as_of"]) for c in deciding],
                          [num(Decimal(str(c["snapshot__price"]))) if c["snapshot__price"] else None for c in deciding],
                          symbol="diamond", color="#ff7f0e", links=cycle_urls([c["id"] for c in deciding]),
                          text=[c["decision__decision__action"] or "" for c in deciding]))
    figure = Figure("trade_chart", f"{trade.instrument.inst_id} around trade {trade.pk} ({source})", traces,
                    link=cycle_url(trade.cycle_id) if trade.cycle_id else "", link_label="the opening cycle",
                    layout={"height": 480, "xaxis": {"rangeslider": {"visible": False}}})
    return {"figure": figure, "deciding": deciding, "candle_source": source}
