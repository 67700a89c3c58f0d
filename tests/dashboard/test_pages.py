"""The cockpit's pages: every page answers on a replay's journal and the live bot's, bad filters are a 400 with
the message in the page, the query count of each page is bounded and does not grow with the rows it shows."""
from __future__ import annotations

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from journal.models import Cycle, CycleOutcome, CycleState, Mode, ScreenerLog, Trade, TradeStatus
from market.models import Instrument
from tests.dashboard.conftest import RUN, replay_journal

PAGES = ("portfolio", "positions", "strategies", "brain", "risk", "health", "playbook", "trades", "cycles", "report")
MAX_QUERIES = 30


@pytest.fixture
def journal(db, cockpit_feed) -> str:  # noqa: ANN001
    return replay_journal(cockpit_feed)


def _figures(html: str) -> list[dict]:
    import json

    match = re.search(r'<script id="figures-data" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1)) if match else []


def test_every_page_answers_for_the_live_bot_and_a_replay_run(admin_client, journal: str) -> None:
    for page in PAGES:
        for query in ("", f"?run={journal}", f"?run={journal}&inst=BTC-USDT-SWAP&from=2025-08-01&to=2025-08-02"):
            response = admin_client.get(f"/dashboard/{page}/{query}")
            assert response.status_code == 200, (page, query, response.content[:500])
            assert b"plotly/plotly.min.js" in response.content


def test_the_replay_report_page_shows_the_report_modules_figures_and_exports_the_trades_as_csv(
        admin_client, journal: str) -> None:
    import csv
    import io

    from journal.report import run_report

    report = run_report(mode=Mode.REPLAY, run_id=journal)
    html = admin_client.get(f"/dashboard/report/?run={journal}").content.decode()
    assert f"{report.final_balance:,.2f}" in html and f"{report.starting_balance:,.2f}" in html
    figures = {f["key"]: f for f in _figures(html)}
    assert len(figures["equity"]["data"][0]["y"]) == len(report.equity_curve)
    names = {t["name"]: t for t in figures["price_trades"]["data"]}
    assert len(names["entries"]["x"]) == len(report.trades)
    assert len(names["exits"]["x"]) == sum(1 for t in report.trades if t.closed_at is not None)
    response = admin_client.get(f"/dashboard/report/?run={journal}&format=csv")
    assert response.status_code == 200 and response["Content-Type"] == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert [int(r["id"]) for r in rows] == [t.id for t in report.trades]
    assert [Decimal(r["pnl_usd"]) for r in rows if r["pnl_usd"]] == [t.pnl_usd for t in report.trades if t.pnl_usd is not None]


def test_the_portfolio_of_a_run_draws_one_equity_point_per_closed_trade_and_links_each_to_its_trade(
        admin_client, journal: str) -> None:
    closed = list(Trade.objects.filter(run_id=journal, status=TradeStatus.CLOSED).order_by("closed_at", "id"))
    assert closed, "the scenario must close a trade"
    html = admin_client.get(f"/dashboard/portfolio/?run={journal}").content.decode()
    figures = {f["key"]: f for f in _figures(html)}
    equity = figures["equity"]["data"][0]
    assert len(equity["y"]) == len(closed)
    start = Decimal("10000")
    assert equity["y"][-1] == pytest.approx(float(start + sum(t.pnl_usd for t in closed)))
    assert equity["customdata"] == [f"/dashboard/trades/{t.pk}/" for t in closed]
    # The live bot has no trade: the run's figures never leak into it.
    live = {f["key"]: f for f in _figures(admin_client.get("/dashboard/portfolio/").content.decode())}
    assert live["equity"]["data"][0]["y"] == []


@pytest.mark.parametrize("query, message", [
    ("inst=DOGE-USDT-SWAP", "unknown instrument &#x27;DOGE-USDT-SWAP&#x27;"),
    ("run=no-such-run", "unknown replay run &#x27;no-such-run&#x27;"),
    ("from=2025-02-30", "from=&#x27;2025-02-30&#x27; is not a date"),
    ("from=2025-08-03&to=2025-08-01", "the date range is empty"),
    ("mode=replay", "mode=replay needs run=&lt;run id&gt;"),
    ("mode=sideways", "mode=&#x27;sideways&#x27;"),
])
def test_a_bad_filter_is_a_400_with_the_message_in_the_page_on_every_page(admin_client, db, query: str,
                                                                           message: str) -> None:
    for page in PAGES:
        response = admin_client.get(f"/dashboard/{page}/?{query}")
        assert response.status_code == 400, (page, query)
        assert message in response.content.decode(), (page, response.content[:800])


def test_a_bad_offset_on_a_list_is_a_400(admin_client, db) -> None:
    response = admin_client.get("/dashboard/trades/?offset=-3")
    assert response.status_code == 400 and "offset=&#x27;-3&#x27; is not a whole number" in response.content.decode()


def test_the_cycle_and_trade_pages_link_both_ways_with_the_admin(admin_client, journal: str) -> None:
    trade = Trade.objects.filter(run_id=journal).order_by("id").first()
    page = admin_client.get(f"/dashboard/trades/{trade.pk}/").content.decode()
    assert f"/admin/journal/trade/{trade.pk}/change/" in page and f"/dashboard/cycles/{trade.cycle_id}/" in page
    cycle_page = admin_client.get(f"/dashboard/cycles/{trade.cycle_id}/").content.decode()
    assert f"/admin/journal/cycle/{trade.cycle_id}/change/" in cycle_page
    assert "trend_pullback" in cycle_page or trade.strategy_used in cycle_page
    assert 'id="indicators"' in cycle_page and "rsi_14" in cycle_page  # the snapshot as a table, not a JSON dump
    admin = admin_client.get(f"/admin/journal/cycle/{trade.cycle_id}/change/").content.decode()
    assert f"/dashboard/cycles/{trade.cycle_id}/" in admin
    admin = admin_client.get(f"/admin/journal/trade/{trade.pk}/change/").content.decode()
    assert f"/dashboard/trades/{trade.pk}/" in admin
    assert admin_client.get("/dashboard/cycles/999999/").status_code == 404


def test_the_trade_chart_has_candles_entry_exit_stop_and_take_profit_and_the_deciding_cycles(
        admin_client, journal: str) -> None:
    trade = Trade.objects.filter(run_id=journal, status=TradeStatus.CLOSED).order_by("id").first()
    figure = _figures(admin_client.get(f"/dashboard/trades/{trade.pk}/").content.decode())[0]
    names = {t["name"]: t for t in figure["data"]}
    assert {"entry", "exit", "stop loss", "take profit", "entry marker", "exit marker", "deciding cycles"} <= set(names)
    assert names["entry marker"]["y"] == [float(trade.entry_price)]
    assert names["exit marker"]["y"] == [float(trade.exit_price)]
    candles = figure["data"][0]
    assert candles["type"] == "candlestick" and len(candles["x"]) > 10
    assert f"/dashboard/cycles/{trade.cycle_id}/" in names["deciding cycles"]["customdata"]


def _grow_journal(run_id: str, *, trades: int, cycles: int) -> None:
    """More rows of every kind the pages show, written in bulk."""
    inst = Instrument.objects.get(inst_id="BTC-USDT-SWAP")
    last = Cycle.objects.filter(run_id=run_id).order_by("-as_of").first()
    new = [Cycle(instrument=inst, mode=Mode.REPLAY, run_id=run_id, as_of=last.as_of + timedelta(minutes=5 * (i + 1)),
                 state=CycleState.DONE, outcome=CycleOutcome.HOLD, snapshot={"compact": True, "price": "80000"},
                 decision={"decision": {"action": "HOLD"}}) for i in range(cycles)]
    Cycle.objects.bulk_create(new)
    new = list(Cycle.objects.filter(run_id=run_id).order_by("-id")[:cycles])
    ScreenerLog.objects.bulk_create([ScreenerLog(instrument=inst, cycle=c, mode=Mode.REPLAY, signal=True, bypassed=i % 2 == 0,
                                                 bypass_reason="open position", analyst_action="HOLD")
                                     for i, c in enumerate(new)])
    base = last.as_of
    Trade.objects.bulk_create([
        Trade(instrument=inst, mode=Mode.REPLAY, run_id=run_id, cycle=new[i % len(new)],
              opened_at=base + timedelta(hours=i), closed_at=base + timedelta(hours=i, minutes=30),
              direction="LONG" if i % 2 else "SHORT", entry_price=Decimal("80000"), exit_price=Decimal("80100"),
              stop_loss=Decimal("79000") if i % 2 else Decimal("81000"), take_profit=Decimal("82000"), size=Decimal("1"),
              pnl_usd=Decimal(i % 7 - 3), fees_usd=Decimal("0.5"), strategy_used=f"s{i % 4}", market_regime="ranging",
              confidence_at_entry=Decimal("0.6"), exit_reason="take_profit", status=TradeStatus.CLOSED)
        for i in range(trades)])
    Trade.objects.bulk_create([
        Trade(instrument=inst, mode=Mode.REPLAY, run_id=run_id, opened_at=base + timedelta(hours=i), direction="LONG",
              entry_price=Decimal("80000"), stop_loss=Decimal("79000"), size=Decimal("1"), status=TradeStatus.OPEN)
        for i in range(5)])


def _queries(client, url: str) -> int:  # noqa: ANN001
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200, (url, response.content[:500])
    return len(ctx.captured_queries)


def test_each_pages_query_count_is_bounded_and_does_not_grow_with_the_rows_shown(
        admin_client, journal: str, django_assert_max_num_queries) -> None:  # noqa: ANN001
    trade = Trade.objects.filter(run_id=journal).order_by("id").first()
    urls = [f"/dashboard/{p}/?run={journal}" for p in PAGES] + [
        f"/dashboard/trades/{trade.pk}/", f"/dashboard/cycles/{trade.cycle_id}/", "/dashboard/controls/",
        f"/dashboard/report/?run={journal}&format=csv", f"/dashboard/brain/?run={journal}&inst=BTC-USDT-SWAP",
        f"/dashboard/cycles/?run={journal}&outcome=hold", "/dashboard/brain/", "/dashboard/cycles/"]
    for url in urls:
        _queries(admin_client, url)  # first visits create what a page needs once (the bot state row)
    small = {}
    for url in urls:
        with django_assert_max_num_queries(MAX_QUERIES):
            small[url] = _queries(admin_client, url)
    _grow_journal(journal, trades=300, cycles=1500)
    large = {url: _queries(admin_client, url) for url in urls}
    assert large == small


def test_the_demos_rows_are_their_own_mode_on_every_page_and_its_week_becomes_a_performance_snapshot(
        admin_client, journal: str) -> None:
    from journal.models import LlmCall, PerformanceSnapshot, RiskRejection
    from tradebot.management.commands.demo import demo_performance_snapshot

    # The replay's rows relabelled as `make demo` writes them: mode demo, no run id, a virtual clock.
    for model in (Cycle, Trade):
        model.objects.filter(run_id=journal).update(mode=Mode.DEMO, run_id="")
    for model in (ScreenerLog, LlmCall, RiskRejection):
        model.objects.filter(cycle__mode=Mode.DEMO).update(mode=Mode.DEMO)
    closed = list(Trade.objects.filter(mode=Mode.DEMO, status=TradeStatus.CLOSED).order_by("closed_at", "id"))
    assert closed
    for query in ("run=demo", "mode=demo"):
        html = admin_client.get(f"/dashboard/portfolio/?{query}").content.decode()
        assert '<option value="demo" selected>' in html
        equity = {f["key"]: f for f in _figures(html)}["equity"]["data"][0]
        assert equity["customdata"] == [f"/dashboard/trades/{t.pk}/" for t in closed]
    for page in PAGES:
        assert admin_client.get(f"/dashboard/{page}/?run=demo").status_code == 200, page
    live = {f["key"]: f for f in _figures(admin_client.get("/dashboard/portfolio/").content.decode())}
    assert live["equity"]["data"][0]["y"] == []  # the demo never shows as the live bot
    assert admin_client.get("/dashboard/portfolio/?mode=demo&run=x").status_code == 400

    snapshot = demo_performance_snapshot()
    assert snapshot.mode == Mode.DEMO and snapshot.total_trades == len(closed)
    assert snapshot.total_pnl == sum(t.pnl_usd for t in closed)
    page = admin_client.get("/admin/journal/performancesnapshot/").content.decode()
    assert f"/admin/journal/performancesnapshot/{snapshot.pk}/change/" in page


def test_prices_show_at_the_instruments_precision_and_the_admin_trade_list_has_pnl_first_and_totals(
        admin_client, journal: str) -> None:
    trade = Trade.objects.filter(run_id=journal, status=TradeStatus.CLOSED).order_by("id").first()
    tenth = Decimal("0.1")  # BTC-USDT-SWAP's tick size
    assert trade.instrument.tick_sz == tenth
    # A whole-dollar entry: at the instrument's precision it still shows its tenths ("96756.0", not "96756").
    Trade.objects.filter(pk=trade.pk).update(entry_price=trade.entry_price.quantize(Decimal(1)))
    trade.refresh_from_db()
    entry = f"{trade.entry_price.quantize(tenth)}"
    assert entry.endswith(".0")
    for url in (f"/dashboard/trades/?run={journal}", f"/dashboard/trades/{trade.pk}/",
                f"/dashboard/report/?run={journal}"):
        html = admin_client.get(url).content.decode()
        assert f">{entry}<" in html or f">{entry} →" in html, url
        assert f"{trade.entry_price:f}" not in html, url  # never the column's 10 decimals
    admin = admin_client.get(f"/admin/journal/trade/?run_id={journal}").content.decode()
    headers = re.findall(r'<th scope="col" class="[^"]*column-(\w+)', admin)
    assert headers.index("net_pnl") < headers.index("entry") < headers.index("opened_at"), headers
    closed = Trade.objects.filter(run_id=journal, status=TradeStatus.CLOSED)
    total = sum(t.pnl_usd for t in closed)
    assert f"net PnL <b>{total:,.2f}</b> USDT" in admin and f"{closed.count()} closed" in admin
    assert f"<td class=\"field-entry\">{entry}</td>" in admin
    change = admin_client.get(f"/admin/journal/trade/{trade.pk}/change/").content.decode()
    assert f'<div class="readonly">{entry}</div>' in change and f"{trade.entry_price:f}" not in change


def test_the_brain_page_counts_each_analysed_cycle_once_in_its_hour(admin_client, journal: str) -> None:
    from collections import Counter

    logs = ScreenerLog.objects.filter(cycle__run_id=journal).exclude(analyst_action="")
    expected = Counter((log.cycle.as_of.replace(minute=0, second=0, microsecond=0).isoformat(), log.analyst_action)
                       for log in logs.select_related("cycle"))
    assert expected
    figure = {f["key"]: f for f in _figures(admin_client.get(f"/dashboard/brain/?run={journal}").content.decode())}
    drawn = Counter()
    for trace in figure["decisions_per_hour"]["data"]:
        for x, y in zip(trace["x"], trace["y"], strict=True):
            drawn[(x, trace["name"])] += y
    assert drawn == expected


def test_the_strategies_page_counted_in_the_database_says_what_the_performance_summary_of_its_trades_says(
        admin_client, journal: str) -> None:
    from brain.performance import TradeRecord, performance_summarize

    _grow_journal(journal, trades=60, cycles=60)  # several strategies, wins and losses
    Trade.objects.filter(run_id=journal, status=TradeStatus.CLOSED, id__in=Trade.objects.filter(
        run_id=journal).order_by("id").values("id")[:10]).update(confidence_at_entry=Decimal("0.85"))
    closed = Trade.objects.filter(run_id=journal, status=TradeStatus.CLOSED, pnl_usd__isnull=False)
    summary = performance_summarize([
        TradeRecord(id=t.id, pnl_usd=t.pnl_usd, opened_at=t.opened_at, closed_at=t.closed_at, strategy=t.strategy_used,
                    regime=t.market_regime, confidence=t.confidence_at_entry, direction=t.direction, inst_id="BTC-USDT-SWAP",
                    pnl_pct=t.pnl_pct, fees_usd=t.fees_usd, funding_usd=t.funding_usd, exit_reason=t.exit_reason)
        for t in closed])
    response = admin_client.get(f"/dashboard/strategies/?run={journal}")
    table = {row["strategy"]: row for row in response.context["table"]}
    assert list(table) == list(summary.by_strategy)
    for name, b in summary.by_strategy.items():
        drawn = table[name]["b"]
        assert (drawn.trades, drawn.wins, drawn.losses, drawn.win_rate) == (b.trades, b.wins, b.losses, b.win_rate)
        assert drawn.total_pnl == pytest.approx(b.total_pnl) and drawn.profit_factor == pytest.approx(b.profit_factor)
        rrs = [abs(t.take_profit - t.entry_price) / abs(t.entry_price - t.stop_loss) for t in closed
               if (t.strategy_used or "unknown") == name and t.take_profit is not None and t.entry_price != t.stop_loss]
        assert table[name]["avg_rr"] == (pytest.approx(sum(rrs) / len(rrs)) if rrs else None)
    figures = {f["key"]: f for f in _figures(response.content.decode())}
    regimes = {t["name"]: t for t in figures["regime_trades"]["data"]}
    assert regimes["trades"]["x"] == list(summary.by_regime)
    assert regimes["trades"]["y"] == [b.trades for b in summary.by_regime.values()]
    calibration = response.context["calibration"]
    assert list(calibration) == list(summary.confidence_calibration) and len(calibration) >= 2
    for label, entry in summary.confidence_calibration.items():
        assert (calibration[label].trades, calibration[label].wins) == (entry.trades, entry.wins)
        assert calibration[label].stated_confidence == entry.stated_confidence
        assert calibration[label].realised_win_rate == entry.realised_win_rate


def test_the_lists_and_the_charts_stay_bounded_as_the_journal_grows(admin_client, journal: str) -> None:
    """A list shows at most a page of rows; the Brain page's decisions are per hour over a month or less and per
    day beyond it (a year of hourly bars was 8,760 per action), each bucket counting its cycles' decisions."""
    from collections import Counter

    from dashboard.selectors_ops import HOURLY_MAX_DAYS
    from dashboard.views import LIST_LIMIT

    _grow_journal(journal, trades=0, cycles=LIST_LIMIT + 50)
    html = admin_client.get(f"/dashboard/cycles/?run={journal}").content.decode()
    assert html.count('<tr><td><a href="/dashboard/cycles/') == LIST_LIMIT and f"next {LIST_LIMIT} →" in html
    figure = {f["key"]: f for f in _figures(admin_client.get(f"/dashboard/brain/?run={journal}").content.decode())}
    hourly = figure["decisions_per_hour"]
    assert "per hour" in hourly["layout"]["title"]["text"]
    assert all(x.endswith(":00:00+00:00") for trace in hourly["data"] for x in trace["x"])
    # The run now spans more than a month: one late cycle, analysed.
    inst = Instrument.objects.get(inst_id="BTC-USDT-SWAP")
    first = Cycle.objects.filter(run_id=journal).order_by("as_of").first()
    late = Cycle.objects.create(instrument=inst, mode=Mode.REPLAY, run_id=journal, state=CycleState.DONE,
                                as_of=first.as_of + timedelta(days=HOURLY_MAX_DAYS + 5), outcome=CycleOutcome.HOLD)
    ScreenerLog.objects.create(instrument=inst, cycle=late, mode=Mode.REPLAY, signal=True, analyst_action="HOLD")
    html = admin_client.get(f"/dashboard/brain/?run={journal}").content.decode()
    daily = {f["key"]: f for f in _figures(html)}["decisions_per_hour"]
    assert "per day" in daily["layout"]["title"]["text"]
    logs = ScreenerLog.objects.filter(cycle__run_id=journal).exclude(analyst_action="").select_related("cycle")
    expected = Counter((log.cycle.as_of.replace(hour=0, minute=0, second=0, microsecond=0).isoformat(),
                        log.analyst_action) for log in logs)
    drawn = Counter()
    for trace in daily["data"]:
        for x, y in zip(trace["x"], trace["y"], strict=True):
            drawn[(x, trace["name"])] += y
    assert drawn == expected
    assert len({x for trace in daily["data"] for x in trace["x"]}) <= HOURLY_MAX_DAYS + 6
    # A filter of a few days inside it is hourly again.
    day = first.as_of.date().isoformat()
    hourly = {f["key"]: f for f in _figures(admin_client.get(
        f"/dashboard/brain/?run={journal}&from={day}&to={day}").content.decode())}["decisions_per_hour"]
    assert "per hour" in hourly["layout"]["title"]["text"] and hourly["data"]
