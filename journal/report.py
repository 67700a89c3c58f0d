"""A run's backtest report: the figures a freqtrade user expects, read from the journal.

API (a selector: reads only, journal imports only market)::

    run_report(*, mode: str, run_id: str | None, inst_id: str | None = None,
               since: datetime | None = None, until: datetime | None = None,
               starting_balance: Decimal | None = None) -> RunReport
    report_trades(*, mode, run_id, inst_id=None, since=None, until=None) -> tuple[TradeRow, ...]  # .trades alone
    trades_csv(report: RunReport | tuple[TradeRow, ...], out: TextIO) -> int  # the per-trade list as CSV, rows written
    report_lines(report: RunReport, *, trade_list: bool = True) -> list[str]  # as text (`manage.py replay`)

`mode` is a `journal.models.Mode` value; `run_id` names one replay run (required
for a replay, ``None`` or ``""`` means the live bot's rows). `inst_id` narrows to
one instrument; `since`/`until` (aware UTC) to a period: [since, until). Bad input
(unknown mode, run id or instrument, since >= until) raises `ReportError` (a
`ValueError`) with a message a page can show.

`RunReport` (frozen) holds:
- the period (`start`, `end`): the arguments, else the run's first and last cycle
  (else its first trade open and last close);
- `starting_balance` (the paper account's `PAPER_START_BALANCE`, plus the PnL of
  the trades closed before `since`), `final_balance`, `pnl_usd`, `pnl_pct`;
- `trades`: every trade of the period (`TradeRow`, open ones too), ordered by
  open time; the figures use the CLOSED ones (closed in the period);
- `by_instrument`, `by_strategy`, `by_exit_reason`, `by_day` (``YYYY-MM-DD`` of
  the close), `by_month` (``YYYY-MM``): tuples of `GroupResult`;
- `sharpe`, `sortino`, `calmar` (floats or None, see below), `max_drawdown`
  (`Drawdown`: fraction of the peak, USD, the peak's and the trough's times);
- `buy_and_hold` (`BuyAndHold`: the instrument's first open and last close in
  the period from the stored candles, else the prices in the cycles' snapshots;
  None when neither or several instruments);
- `equity_curve`: `EquityPoint`s, the starting balance at `start` then the
  equity after each closed trade (realised equity, as freqtrade's backtest).

Money is `Decimal`. Ratios come from DAILY returns over every UTC calendar day
of the period (a day with no close returns 0): r_d = that day's closed PnL /
the equity at the day's start. Sharpe = mean(r) / stdev(r) (sample) * sqrt(365);
Sortino = mean(r) / sqrt(mean(min(r, 0)^2)) * sqrt(365); Calmar = (total return
* 365 / days) / max drawdown. Each is None when it is undefined (fewer than two
days, no dispersion, no losing day, no drawdown).
"""
from __future__ import annotations

import csv
import math
import operator
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TextIO

from django.conf import settings
from django.db.models import Max, Min, QuerySet, Sum

from journal.models import Cycle, Mode, Trade, TradeStatus
from market.models import TIMEFRAME_SECONDS, Candle, Instrument

ZERO = Decimal(0)
CENT = Decimal("0.01")


class ReportError(ValueError):
    """The report cannot be made from these arguments (unknown run id, instrument, mode; a bad period)."""


@dataclass(frozen=True)
class TradeRow:
    id: int
    inst_id: str
    direction: str
    status: str
    strategy: str
    regime: str
    exit_reason: str
    opened_at: datetime
    closed_at: datetime | None
    duration_seconds: int | None
    entry_price: Decimal
    exit_price: Decimal | None
    stop_loss: Decimal
    take_profit: Decimal | None
    size: Decimal
    leverage: Decimal
    pnl_usd: Decimal | None
    pnl_pct: Decimal | None
    fees_usd: Decimal
    funding_usd: Decimal
    cycle_id: int | None


@dataclass(frozen=True)
class GroupResult:
    key: str
    trades: int
    wins: int
    draws: int
    losses: int
    pnl_usd: Decimal
    avg_pnl_pct: Decimal | None  # mean of the trades' PnL / margin
    fees_usd: Decimal
    funding_usd: Decimal
    avg_duration_seconds: int | None

    @property
    def win_rate(self) -> Decimal | None:
        return (Decimal(self.wins) / Decimal(self.trades)).quantize(Decimal("0.0001")) if self.trades else None


@dataclass(frozen=True)
class EquityPoint:
    ts: datetime
    equity: Decimal
    trade_id: int | None  # the trade whose close made this point (None for the start)


@dataclass(frozen=True)
class Drawdown:
    pct: Decimal  # fraction of the peak, 0 when equity never fell
    usd: Decimal
    peak_at: datetime | None
    trough_at: datetime | None
    peak_equity: Decimal | None
    trough_equity: Decimal | None


@dataclass(frozen=True)
class BuyAndHold:
    inst_id: str
    start_price: Decimal
    end_price: Decimal
    return_pct: Decimal  # fraction: end / start - 1
    pnl_usd: Decimal  # the starting balance held unlevered, no fees
    source: str  # "candles <tf>" or "cycle snapshots"


@dataclass(frozen=True)
class RunReport:
    mode: str
    run_id: str
    inst_id: str | None
    start: datetime | None
    end: datetime | None
    starting_balance: Decimal
    final_balance: Decimal
    pnl_usd: Decimal
    pnl_pct: Decimal  # fraction of the starting balance
    trades: tuple[TradeRow, ...]
    closed_trades: int
    open_trades: int
    wins: int
    draws: int
    losses: int
    profit_factor: Decimal | None
    fees_usd: Decimal
    funding_usd: Decimal
    best_trade: TradeRow | None
    worst_trade: TradeRow | None
    by_instrument: tuple[GroupResult, ...]
    by_strategy: tuple[GroupResult, ...]
    by_exit_reason: tuple[GroupResult, ...]
    by_day: tuple[GroupResult, ...]
    by_month: tuple[GroupResult, ...]
    sharpe: float | None
    sortino: float | None
    calmar: float | None
    max_drawdown: Drawdown
    buy_and_hold: BuyAndHold | None
    equity_curve: tuple[EquityPoint, ...]

    @property
    def win_rate(self) -> Decimal | None:
        if not self.closed_trades:
            return None
        return (Decimal(self.wins) / Decimal(self.closed_trades)).quantize(Decimal("0.0001"))

    @property
    def days(self) -> int:
        """Calendar days of the period, at least 1 (as freqtrade counts them)."""
        if self.start is None or self.end is None:
            return 1
        return max(1, math.ceil((self.end - self.start) / timedelta(days=1)))


# TradeRow's fields in order, as the journal names them (rows are built positionally from values_list).
_TRADE_FIELDS = (
    "id", "instrument__inst_id", "direction", "status", "strategy_used", "market_regime", "exit_reason", "opened_at",
    "closed_at", "duration_seconds", "entry_price", "exit_price", "stop_loss", "take_profit", "size", "leverage",
    "pnl_usd", "pnl_pct", "fees_usd", "funding_usd", "cycle_id",
)


@dataclass(frozen=True)
class _Scope:
    cycles: QuerySet[Cycle]
    trades: QuerySet[Trade]
    start: datetime | None
    end: datetime | None
    rows: tuple[TradeRow, ...]


def _scope(*, mode: str, run_id: str, inst_id: str | None, since: datetime | None,
           until: datetime | None) -> _Scope:
    """Check the arguments (ReportError) and read the period and its trades."""
    if mode not in Mode.values:
        raise ReportError(f"unknown mode {mode!r} (one of {', '.join(Mode.values)})")
    if mode == Mode.REPLAY and not run_id:
        raise ReportError("a replay report needs a run id")
    if since is not None and until is not None and since >= until:
        raise ReportError(f"the period is empty: {since.isoformat()} is not before {until.isoformat()}")
    instrument = None
    if inst_id:
        instrument = Instrument.objects.filter(inst_id=inst_id).first()
        if instrument is None:
            raise ReportError(f"unknown instrument {inst_id!r}")
    cycles = Cycle.objects.filter(mode=mode, run_id=run_id)
    trades_qs = Trade.objects.filter(mode=mode, run_id=run_id)
    if run_id and not cycles.exists() and not trades_qs.exists():
        raise ReportError(f"no run {run_id!r} in the journal")
    if instrument is not None:
        cycles, trades_qs = cycles.filter(instrument=instrument), trades_qs.filter(instrument=instrument)
    start, end = _period(cycles, trades_qs, since, until)
    in_period = trades_qs
    if end is not None:
        in_period = in_period.filter(opened_at__lt=end)
    if start is not None:
        in_period = in_period.exclude(closed_at__lt=start)
    # Tuples straight into TradeRow (its fields are _TRADE_FIELDS in order): 5,000 rows without a dict each.
    rows = tuple(TradeRow(*values) for values in in_period.order_by("opened_at", "id").values_list(*_TRADE_FIELDS))
    return _Scope(cycles=cycles, trades=trades_qs, start=start, end=end, rows=rows)


def report_trades(*, mode: str, run_id: str | None, inst_id: str | None = None, since: datetime | None = None,
                  until: datetime | None = None) -> tuple[TradeRow, ...]:
    """`run_report(...).trades` (the same checks, period and rows) without the figures: what the CSV needs."""
    return _scope(mode=mode, run_id=run_id or "", inst_id=inst_id, since=since, until=until).rows


def run_report(*, mode: str, run_id: str | None, inst_id: str | None = None, since: datetime | None = None,
               until: datetime | None = None, starting_balance: Decimal | None = None) -> RunReport:
    """The report of one run (or the live bot) over a period; see the module docstring."""
    run_id = run_id or ""
    scope = _scope(mode=mode, run_id=run_id, inst_id=inst_id, since=since, until=until)
    cycles, start, end, rows = scope.cycles, scope.start, scope.end, scope.rows

    base = Decimal(settings.PAPER_START_BALANCE) if starting_balance is None else Decimal(starting_balance)
    if since is not None:
        # The account carried the PnL of what closed before the period into it.
        before = Trade.objects.filter(mode=mode, run_id=run_id, status=TradeStatus.CLOSED, closed_at__lt=since)
        base += before.aggregate(v=Sum("pnl_usd"))["v"] or ZERO

    closed = sorted(
        (t for t in rows if t.status == TradeStatus.CLOSED and t.pnl_usd is not None and t.closed_at is not None
         and (until is None or t.closed_at < until)),
        key=lambda t: (t.closed_at, t.id),
    )
    pnl = sum((t.pnl_usd for t in closed), ZERO)  # type: ignore[misc]
    won = sum((t.pnl_usd for t in closed if t.pnl_usd > 0), ZERO)  # type: ignore[operator, misc]
    lost = -sum((t.pnl_usd for t in closed if t.pnl_usd < 0), ZERO)  # type: ignore[operator, misc]
    curve = _equity_curve(base, start, closed)
    drawdown = _max_drawdown(curve)
    daily = _daily_returns(base, start, end, closed)
    report_days = max(1, math.ceil((end - start) / timedelta(days=1))) if start and end else 1
    return RunReport(
        mode=mode, run_id=run_id, inst_id=inst_id or None, start=start, end=end,
        starting_balance=base, final_balance=base + pnl, pnl_usd=pnl,
        pnl_pct=(pnl / base) if base else ZERO, trades=rows, closed_trades=len(closed),
        open_trades=sum(1 for t in rows if t.status == TradeStatus.OPEN),
        wins=sum(1 for t in closed if t.pnl_usd > 0),  # type: ignore[operator]
        draws=sum(1 for t in closed if t.pnl_usd == 0),
        losses=sum(1 for t in closed if t.pnl_usd < 0),  # type: ignore[operator]
        profit_factor=(won / lost).quantize(Decimal("0.0001")) if lost else None,
        fees_usd=sum((t.fees_usd for t in rows), ZERO), funding_usd=sum((t.funding_usd for t in rows), ZERO),
        best_trade=max(closed, key=lambda t: t.pnl_usd, default=None),  # type: ignore[arg-type, return-value]
        worst_trade=min(closed, key=lambda t: t.pnl_usd, default=None),  # type: ignore[arg-type, return-value]
        by_instrument=_groups(closed, lambda t: t.inst_id),
        by_strategy=_groups(closed, lambda t: t.strategy or "-"),
        by_exit_reason=_groups(closed, lambda t: t.exit_reason or "-"),
        # The close's UTC day and month, cut from its ISO text (strftime per trade was a third of the grouping).
        by_day=_groups(closed, lambda t: t.closed_at.isoformat()[:10], ordered=True),  # type: ignore[union-attr]
        by_month=_groups(closed, lambda t: t.closed_at.isoformat()[:7], ordered=True),  # type: ignore[union-attr]
        sharpe=_sharpe(daily), sortino=_sortino(daily),
        calmar=_calmar(pnl / base if base else ZERO, report_days, drawdown.pct),
        max_drawdown=drawdown,
        buy_and_hold=_buy_and_hold(base, start, end, cycles, rows, inst_id),
        equity_curve=curve,
    )


def _period(cycles: QuerySet[Cycle], trades: QuerySet[Trade], since: datetime | None,
            until: datetime | None) -> tuple[datetime | None, datetime | None]:
    if since is not None and until is not None:
        return since, until
    span = cycles.aggregate(first=Min("as_of"), last=Max("as_of"))
    first, last = span["first"], span["last"]
    if first is None:
        span = trades.aggregate(first=Min("opened_at"), last=Max("closed_at"), last_open=Max("opened_at"))
        first, last = span["first"], span["last"] or span["last_open"]
    return since or first, until or last


def _groups(closed: list[TradeRow], key: Callable[[TradeRow], str], *,
            ordered: bool = False) -> tuple[GroupResult, ...]:
    # One pass over the trades with running sums per group (a year's 5,000 trades in 365 days: one loop, not
    # eight per group).
    acc: dict[str, list] = {}
    for t in closed:
        name = key(t)
        a = acc.get(name)
        if a is None:
            # trades, wins, draws, losses, pnl, pct sum, pct count, fees, funding, duration sum, duration count
            a = acc[name] = [0, 0, 0, 0, ZERO, ZERO, 0, ZERO, ZERO, 0, 0]
        pnl = t.pnl_usd
        a[0] += 1
        if pnl > 0:  # type: ignore[operator]
            a[1] += 1
        elif pnl == 0:
            a[2] += 1
        elif pnl < 0:  # type: ignore[operator]
            a[3] += 1
        a[4] += pnl
        if t.pnl_pct is not None:
            a[5] += t.pnl_pct
            a[6] += 1
        a[7] += t.fees_usd
        a[8] += t.funding_usd
        if t.duration_seconds is not None:
            a[9] += t.duration_seconds
            a[10] += 1
    out = [GroupResult(key=name, trades=a[0], wins=a[1], draws=a[2], losses=a[3], pnl_usd=a[4],
                       avg_pnl_pct=a[5] / a[6] if a[6] else None, fees_usd=a[7], funding_usd=a[8],
                       avg_duration_seconds=round(a[9] / a[10]) if a[10] else None)
           for name, a in acc.items()]
    # Days and months in time order; the other groups best first, as freqtrade's tables.
    out.sort(key=(lambda g: g.key) if ordered else (lambda g: (-g.pnl_usd, g.key)))
    return tuple(out)


def _equity_curve(base: Decimal, start: datetime | None, closed: list[TradeRow]) -> tuple[EquityPoint, ...]:
    points = []
    if start is not None:
        points.append(EquityPoint(ts=start, equity=base, trade_id=None))
    equity = base
    for t in closed:
        equity += t.pnl_usd  # type: ignore[operator]
        points.append(EquityPoint(ts=t.closed_at, equity=equity, trade_id=t.id))  # type: ignore[arg-type]
    return tuple(points)


def _max_drawdown(curve: tuple[EquityPoint, ...]) -> Drawdown:
    best = Drawdown(pct=ZERO, usd=ZERO, peak_at=None, trough_at=None, peak_equity=None, trough_equity=None)
    peak: EquityPoint | None = None
    for point in curve:
        if peak is None or point.equity > peak.equity:
            peak = point
            continue
        fall = peak.equity - point.equity
        pct = fall / peak.equity if peak.equity > 0 else ZERO
        if pct > best.pct:
            best = Drawdown(pct=pct, usd=fall, peak_at=peak.ts, trough_at=point.ts, peak_equity=peak.equity,
                            trough_equity=point.equity)
    return best


def _daily_returns(base: Decimal, start: datetime | None, end: datetime | None, closed: list[TradeRow]) -> list[float]:
    if start is None or end is None:
        return []
    by_day: dict = defaultdict(lambda: ZERO)
    for t in closed:
        by_day[t.closed_at.date()] += t.pnl_usd  # type: ignore[union-attr, operator]
    # Every UTC calendar day of the period; a close after the period's end date (an open end) counts on its day.
    last_day = max([end.date(), *by_day.keys()])
    day, equity, returns = start.date(), base, []
    while day <= last_day:
        change = by_day.get(day, ZERO)
        returns.append(float(change / equity) if equity > 0 else 0.0)
        equity += change
        day += timedelta(days=1)
    return returns


def _sharpe(returns: list[float]) -> float | None:
    if len(returns) < 2:
        return None
    mean = sum(returns) / len(returns)
    stdev = math.sqrt(sum((r - mean) ** 2 for r in returns) / (len(returns) - 1))
    return round(mean / stdev * math.sqrt(365), 4) if stdev > 0 else None


def _sortino(returns: list[float]) -> float | None:
    if len(returns) < 2:
        return None
    mean = sum(returns) / len(returns)
    downside = math.sqrt(sum(min(r, 0.0) ** 2 for r in returns) / len(returns))
    return round(mean / downside * math.sqrt(365), 4) if downside > 0 else None


def _calmar(total_return: Decimal, days: int, max_dd: Decimal) -> float | None:
    if max_dd <= 0:
        return None
    return round(float(total_return) * 365 / days / float(max_dd), 4)


def _buy_and_hold(base: Decimal, start: datetime | None, end: datetime | None, cycles: QuerySet[Cycle],
                  rows: tuple[TradeRow, ...], inst_id: str | None) -> BuyAndHold | None:
    if start is None or end is None:
        return None
    if not inst_id:
        # The run's distinct instrument ids, unordered (the model's ordering would make the database sort every
        # cycle of the run to dedupe them), from the cycles' (run_id, mode, as_of, id, instrument, state) index alone.
        ids = cycles.order_by().values("instrument_id").distinct()[:2]
        names = set(Instrument.objects.filter(pk__in=ids).values_list("inst_id", flat=True))
        names = names or {t.inst_id for t in rows}
        if len(names) != 1:
            return None  # several instruments (or none): no single market to hold
        inst_id = names.pop()
    prices = _candle_prices(inst_id, start, end) or _snapshot_prices(cycles, inst_id)
    if prices is None:
        return None
    first, last, source = prices
    change = last / first - 1
    return BuyAndHold(inst_id=inst_id, start_price=first, end_price=last, return_pct=change,
                      pnl_usd=(base * change).quantize(Decimal("0.00000001")), source=source)


def _candle_prices(inst_id: str, start: datetime, end: datetime) -> tuple[Decimal, Decimal, str] | None:
    """The first bar's open and the last bar's close of the finest stored timeframe covering the period."""
    for tf in sorted(TIMEFRAME_SECONDS, key=TIMEFRAME_SECONDS.__getitem__):
        bars = Candle.objects.filter(instrument__inst_id=inst_id, timeframe=tf, ts__gte=start,
                                     ts__lt=end - timedelta(seconds=TIMEFRAME_SECONDS[tf]) + timedelta(seconds=1))
        first = bars.order_by("ts").values_list("open", flat=True).first()
        if first is None:
            continue
        last = bars.order_by("-ts").values_list("close", flat=True).first()
        return Decimal(first), Decimal(last), f"candles {tf}"  # type: ignore[arg-type]
    return None


def _snapshot_prices(cycles: QuerySet[Cycle], inst_id: str) -> tuple[Decimal, Decimal, str] | None:
    """A replay of a CSV or the synthetic market stores no candles: the price each cycle saw is in its snapshot."""
    mine = cycles.filter(instrument__inst_id=inst_id, snapshot__isnull=False)
    first = mine.order_by("as_of", "id").values_list("snapshot", flat=True).first()
    last = mine.order_by("-as_of", "-id").values_list("snapshot", flat=True).first()
    try:
        a, b = Decimal(str(first["price"])), Decimal(str(last["price"]))  # type: ignore[index]
    except (TypeError, KeyError, ArithmeticError, ValueError):
        return None
    return (a, b, "cycle snapshots") if a > 0 else None


CSV_COLUMNS = (
    "id", "inst_id", "direction", "status", "strategy", "regime", "opened_at", "closed_at", "duration_seconds",
    "entry_price", "exit_price", "stop_loss", "take_profit", "size", "leverage", "pnl_usd", "pnl_pct", "fees_usd",
    "funding_usd", "exit_reason", "cycle_id",
)


_CSV_VALUES = operator.attrgetter(*CSV_COLUMNS)
_OPENED, _CLOSED = CSV_COLUMNS.index("opened_at"), CSV_COLUMNS.index("closed_at")


def trades_csv(report: RunReport | tuple[TradeRow, ...], out: TextIO) -> int:
    """Write the report's per-trade list (or `report_trades`'s) as CSV (times ISO UTC, money as exact decimals);
    return the rows written."""
    trades = report.trades if isinstance(report, RunReport) else report
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for t in trades:
        row = ["" if v is None else v for v in _CSV_VALUES(t)]
        row[_OPENED] = t.opened_at.isoformat()
        row[_CLOSED] = t.closed_at.isoformat() if t.closed_at else ""
        writer.writerow(row)
    return len(trades)


def _money(value: Decimal | None) -> str:
    return "-" if value is None else f"{value.quantize(CENT):,}"


def _pct(value: Decimal | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}"


def _trade_ref(trade: TradeRow | None) -> str:
    return "-" if trade is None else f"#{trade.id} {_money(trade.pnl_usd)} USDT"


def _when(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M}"


def _numeric(cell: str) -> bool:
    return cell == "-" or cell.replace(",", "").replace("%", "").replace(".", "").replace(":", "").lstrip("-").isdigit()


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A text table; a column of numbers is right-aligned, any other left-aligned."""
    columns = list(zip(header, *rows, strict=True))
    widths = [max(len(c) for c in column) for column in columns]
    right = [i > 0 and all(_numeric(c) for c in column[1:]) for i, column in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()
    return [f"==== {title}", line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _group_table(title: str, groups: tuple[GroupResult, ...]) -> list[str]:
    header = ["", "trades", "wins", "draws", "losses", "win rate", "PnL USDT", "avg PnL %", "fees", "avg duration"]
    rows = [[g.key, str(g.trades), str(g.wins), str(g.draws), str(g.losses), _pct(g.win_rate), _money(g.pnl_usd),
             _pct(g.avg_pnl_pct), _money(g.fees_usd), _duration(g.avg_duration_seconds)] for g in groups]
    return _table(title, header, rows or [["(no closed trade)", *[""] * (len(header) - 1)]])


def report_lines(report: RunReport, *, trade_list: bool = True) -> list[str]:
    """The report as text, in freqtrade's order: trades, groups, then the summary with buy-and-hold beside it."""
    lines: list[str] = []
    if trade_list:
        header = ["trade", "instrument", "side", "strategy", "opened", "closed", "entry", "exit", "PnL USDT", "PnL %",
                  "exit reason"]
        rows = [[str(t.id), t.inst_id, t.direction, t.strategy or "-", _when(t.opened_at), _when(t.closed_at),
                 f"{t.entry_price.normalize():f}", "-" if t.exit_price is None else f"{t.exit_price.normalize():f}",
                 _money(t.pnl_usd), _pct(t.pnl_pct), t.exit_reason or t.status] for t in report.trades]
        lines += _table("TRADES", header, rows or [["(none)", *[""] * (len(header) - 1)]]) + [""]
    for title, groups in (("RESULTS PER INSTRUMENT", report.by_instrument),
                          ("RESULTS PER STRATEGY", report.by_strategy),
                          ("RESULTS PER EXIT REASON", report.by_exit_reason), ("RESULTS PER DAY", report.by_day),
                          ("RESULTS PER MONTH", report.by_month)):
        lines += _group_table(title, groups) + [""]
    dd, bh = report.max_drawdown, report.buy_and_hold
    summary = [
        ("run", f"{report.mode} {report.run_id or '(live)'}" + (f" {report.inst_id}" if report.inst_id else "")),
        ("period", f"{_when(report.start)} -> {_when(report.end)} ({report.days} days)"),
        ("starting balance", f"{_money(report.starting_balance)} USDT"),
        ("final balance", f"{_money(report.final_balance)} USDT"),
        ("absolute profit", f"{_money(report.pnl_usd)} USDT"),
        ("total profit %", _pct(report.pnl_pct)),
        ("trades", f"{len(report.trades)} ({report.closed_trades} closed, {report.open_trades} open)"),
        ("wins / draws / losses",
         f"{report.wins} / {report.draws} / {report.losses}  win rate {_pct(report.win_rate)}"),
        ("profit factor", "-" if report.profit_factor is None else f"{report.profit_factor:.2f}"),
        ("best trade", _trade_ref(report.best_trade)),
        ("worst trade", _trade_ref(report.worst_trade)),
        ("fees", f"{_money(report.fees_usd)} USDT"),
        ("funding", f"{_money(report.funding_usd)} USDT"),
        ("Sharpe / Sortino / Calmar", f"{_ratio(report.sharpe)} / {_ratio(report.sortino)} / {_ratio(report.calmar)}"),
        ("max drawdown", f"{_pct(dd.pct)} ({_money(dd.usd)} USDT) {_when(dd.peak_at)} -> {_when(dd.trough_at)}"
         if dd.peak_at else "0.00%"),
        ("buy and hold", "-" if bh is None else
         f"{_pct(bh.return_pct)} ({_money(bh.pnl_usd)} USDT) {bh.inst_id} {bh.start_price.normalize():f} -> "
         f"{bh.end_price.normalize():f} ({bh.source})"),
    ]
    return lines + _table("SUMMARY", ["metric", "value"], [[k, v] for k, v in summary])
