"""Number formats for the cockpit: money with 2 decimals, prices without trailing zeros, shares as %."""
from __future__ import annotations

from datetime import timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from django import template
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

register = template.Library()


def _dec(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return value if isinstance(value, Decimal) else Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


@register.filter
def money(value: Any) -> str:
    d = _dec(value)
    return "–" if d is None or not d.is_finite() else f"{d:,.2f}"


@register.filter
def price(value: Any, tick: Any = None) -> str:
    """A price at its instrument's precision when the tick size is given (`x|price:trade.instrument.tick_sz`:
    tick 0.1 -> one decimal); otherwise without trailing zeros, at most 6 decimals (indicators, ratios)."""
    d = _dec(value)
    if d is None or not d.is_finite():
        return "–"
    step = _dec(tick)
    if step is not None and step.is_finite() and step > 0:
        places = max(0, -step.normalize().as_tuple().exponent)
        return f"{d.quantize(Decimal(1).scaleb(-places)):f}"
    text = f"{d:f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    whole, _, frac = text.partition(".")
    return whole + ("." + frac[:6] if frac else "")


@register.filter
def pct(value: Any, places: int = 1) -> str:
    d = _dec(value)
    return "–" if d is None or not d.is_finite() else f"{d * 100:.{int(places)}f}%"


@register.filter
def sign(value: Any) -> str:
    d = _dec(value)
    return "" if d is None else ("pos" if d > 0 else "neg" if d < 0 else "")


@register.filter
def age(value: Any) -> str:
    if not isinstance(value, timedelta):
        return "–"
    s = int(value.total_seconds())
    if s < 0:
        return "in the future"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes}m" if hours else f"{minutes}m {s}s"


@register.filter
def get(mapping: Any, key: Any) -> Any:
    return mapping.get(key) if hasattr(mapping, "get") else None


GROUP_HEADER = ('<table><tr><th>key</th><th class="num">trades</th><th class="num">W / D / L</th><th class="num">PnL</th>'
                '<th class="num">avg PnL %</th><th class="num">fees</th><th class="num">funding</th></tr>\n')


@register.filter
def group_table(groups: Any) -> SafeString:
    """A report's results per group (journal.report.GroupResult) as a table, formatted here rather than by the
    template engine: a year's report has 365 days of them (3,650 template variables were ~100 ms)."""
    rows = [f'<tr><td>{escape(g.key or "?")}</td><td class="num">{g.trades}</td>'
            f'<td class="num">{g.wins} / {g.draws} / {g.losses}</td>'
            f'<td class="num {sign(g.pnl_usd)}">{money(g.pnl_usd)}</td>\n<td class="num">{pct(g.avg_pnl_pct, 2)}</td>'
            f'<td class="num">{money(g.fees_usd)}</td><td class="num">{money(g.funding_usd)}</td></tr>\n'
            for g in groups]
    body = "".join(rows) or '<tr><td colspan="7">none</td></tr>\n'
    return mark_safe(GROUP_HEADER + body + "</table>")  # noqa: S308 - every value above is escaped or a number


def _utc(value: Any) -> str:
    """As the template's `date:"Y-m-d H:i"` (TIME_ZONE is UTC; the journal's times are aware UTC)."""
    return "" if value is None else f"{value:%Y-%m-%d %H:%M}"


@register.simple_tag
def report_trade_rows(trades: Any, ticks: Any) -> SafeString:
    """The replay report's trade table rows (journal.report.TradeRow), formatted here: 200 rows of 12 cells
    through the template engine were a third of the page's time."""
    from dashboard.selectors_trading import trade_urls

    trades = list(trades)
    if not trades:
        return mark_safe('<tr><td colspan="11">no trade</td></tr>')  # noqa: S308
    ticks = ticks if hasattr(ticks, "get") else {}
    rows = []
    for t, url in zip(trades, trade_urls([t.id for t in trades]), strict=True):
        tick = ticks.get(t.inst_id)
        rows.append(
            f'<tr><td><a href="{url}">#{t.id}</a></td><td>{escape(t.inst_id)}</td><td>{escape(t.direction)}</td>'
            f'<td>{_utc(t.opened_at)}</td><td>{_utc(t.closed_at)}</td>\n<td class="num">{price(t.entry_price, tick)}</td>'
            f'<td class="num">{price(t.exit_price, tick)}</td><td class="num {sign(t.pnl_usd)}">{money(t.pnl_usd)}</td>'
            f'<td class="num">{pct(t.pnl_pct, 2)}</td><td>{escape(t.strategy)}</td><td>{escape(t.exit_reason)}</td></tr>\n')
    return mark_safe("".join(rows))  # noqa: S308 - every value above is escaped, a number or a formatted time
