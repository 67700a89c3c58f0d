"""The cockpit in a real browser: Selenium driving Debian's chromium and chromium-driver against a live server.

On a journal made by a short replay: log in through the admin's login form, open every page, check each chart
drew its traces with the expected number of points (plotly's own objects in the page: the graph div's `data`
and `calcdata`), find a trade's entry and exit markers, halt from the dashboard and see `manage.py bot status`
say HALTED and the next cycle place no order; a user who is not staff gets the login page and a POST without
the CSRF token is refused. A screenshot of every page goes to var/test-artifacts/browser/ (TEST_ARTIFACTS_DIR).

Without chromium or chromedriver the tests skip with the reason (`.ci/run` installs them); under
REQUIRE_SERVICES=1 they fail instead.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client

from execution.models import BotState, BotStatus, Order
from journal.models import Cycle, CycleOutcome, Mode, Trade, TradeStatus
from tests.conftest import ROOT, missing_service
from tests.dashboard.conftest import RUN, replay_journal

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "var" / "test-artifacts") / "browser"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")
WAIT_SECONDS = 20
PASSWORD = "browser-pw"

# Every figure's traces as plotly holds them in the page: what the server sent (`data`) and what plotly
# computed to draw (`calcdata`: one entry per point/bar/candle, a BADNUM x for an empty trace).
CHARTS_JS = """
const num = v => typeof v === 'number' && isFinite(v);
return Array.from(document.querySelectorAll('div.chart')).map(el => ({
  key: el.dataset.key,
  svg: el.querySelectorAll('svg.main-svg').length,
  traces: (el.data || []).map((t, i) => ({
    name: t.name, type: t.type, sent: (t.x || []).length,
    drawn: ((el.calcdata || [])[i] || []).filter(d => num(d.x) || num(d.p) || num(d.pos)).length,
    x: t.x && t.x.length <= 2 ? t.x : null, y: t.y && t.y.length <= 2 ? t.y : null,
  })),
}));
"""
DRAWN_JS = """
const charts = Array.from(document.querySelectorAll('div.chart'));
if (!charts.length) { return document.readyState === 'complete'; }  // a page without figures
return document.body.hasAttribute('data-charts-drawn') && charts.every(el => el.calcdata && el._fullLayout);
"""


def _missing_browser() -> str:
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install chromium chromium-driver; .ci/run does)"
    return ""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if why := _missing_browser():
        missing_service(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="tradebot-chromium-")
    options.add_argument(f"--user-data-dir={profile}")  # a fresh profile: no state from an earlier run
    # The Debian driver given by path: Selenium never tries to download one.
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or ""), options=options)
    driver.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def fast_passwords(settings) -> None:  # noqa: ANN001
    # PBKDF2's million rounds cost ~1 s a login on this machine; the login path is the same with MD5.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def trader(fast_passwords) -> User:  # noqa: ANN001
    from django.contrib.auth.models import Permission

    user = User.objects.create_user("trader", password=PASSWORD, is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_trade"))  # the admin's trade list
    return user


@pytest.fixture
def driver(browser, live_server) -> Iterator[Any]:  # noqa: ANN001
    """The module's browser, logged out: each test starts with no cookies."""
    browser.get(live_server.url + "/admin/login/")
    browser.delete_all_cookies()
    yield browser
    browser.delete_all_cookies()


def _wait(driver: Any, condition: Any) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A form's submit reloads the page: an element found on the old page goes stale before its text is read.
    return WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                         ).until(condition)


def _login(driver: Any, base: str, username: str, next_path: str = "/dashboard/portfolio/") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/admin/login/?next={next_path}")
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(PASSWORD)
    driver.find_element(By.CSS_SELECTOR, "#login-form [type=submit]").click()
    _wait(driver, lambda d: d.current_url.startswith(base + next_path.split("?")[0]))


def _open(driver: Any, url: str, shot: str) -> dict[str, dict[str, Any]]:
    """Open a page, wait until plotly drew every chart, save a screenshot; the charts by key."""
    driver.get(url)
    _wait(driver, lambda d: d.execute_script(DRAWN_JS))
    driver.save_screenshot(str(ARTIFACTS / f"{shot}.png"))
    assert "Bad request" not in driver.title and "Server Error" not in driver.page_source, (url, driver.title)
    charts = {c["key"]: c for c in driver.execute_script(CHARTS_JS)}
    for key, chart in charts.items():
        assert chart["svg"] > 0, (url, key, "no SVG drawn")
        for trace in chart["traces"]:
            # plotly drew every point the server sent (a candle, a bar, a marker each).
            assert trace["drawn"] == trace["sent"], (url, key, trace)
    return charts


def _points(chart: dict[str, Any], name: str | None = None) -> int:
    traces = [t for t in chart["traces"] if name is None or t["name"] == name]
    assert traces, (chart["key"], name, [t["name"] for t in chart["traces"]])
    return sum(t["drawn"] for t in traces)


def test_every_page_draws_its_charts_with_the_expected_points_and_a_trade_shows_its_entry_and_exit_markers(
        driver, live_server, trader, cockpit_feed) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    from journal.report import run_report

    run = replay_journal(cockpit_feed)
    base = live_server.url
    _login(driver, base, "trader")
    closed = list(Trade.objects.filter(run_id=run, status=TradeStatus.CLOSED).order_by("closed_at", "id"))
    assert closed, "the replay must close a trade"
    q = f"?run={run}"

    charts = _open(driver, f"{base}/dashboard/portfolio/{q}", "portfolio")
    assert _points(charts["equity"]) == len(closed) == _points(charts["drawdown"])
    assert _points(charts["daily_pnl"]) == len({t.closed_at.date() for t in closed})

    charts = _open(driver, f"{base}/dashboard/strategies/{q}", "strategies")
    assert _points(charts["strategy_pnl"]) == len({t.strategy_used for t in closed})
    assert _points(charts["regime_trades"], "trades") == len({t.market_regime for t in closed})

    report = run_report(mode=Mode.REPLAY, run_id=run)
    charts = _open(driver, f"{base}/dashboard/report/{q}", "report")
    assert _points(charts["equity"]) == len(report.equity_curve)
    assert _points(charts["price_trades"], "entries") == Trade.objects.filter(run_id=run).count()
    assert _points(charts["price_trades"], "exits") == len(closed)

    cycles = Cycle.objects.filter(run_id=run).count()
    charts = _open(driver, f"{base}/dashboard/brain/{q}", "brain")
    # Every analysed cycle of the run is one decision in the per-hour bars (the rules brain answers each).
    decided = Cycle.objects.filter(run_id=run, decision__isnull=False).count()
    assert 0 < _points(charts["decisions_per_hour"]) <= decided <= cycles
    charts = _open(driver, f"{base}/dashboard/risk/{q}", "risk")
    assert _points(charts["daily_loss"]) == 2
    for page in ("positions", "health", "playbook", "trades", "cycles"):
        _open(driver, f"{base}/dashboard/{page}/{q}", page)
    _open(driver, f"{base}/dashboard/controls/", "controls")

    # The admin's trade list: PnL in view without a horizontal scroll (1400 px wide), totals above the rows.
    _open(driver, f"{base}/admin/journal/trade/?run_id={run}", "admin-trades")
    box = driver.execute_script(
        "const results = document.querySelector('div.results').getBoundingClientRect();"
        "const pnl = document.querySelector('th.column-net_pnl').getBoundingClientRect();"
        "return {pnl: pnl.right, results: results.right, page: document.documentElement.scrollWidth,"
        " view: document.documentElement.clientWidth};")
    assert box["pnl"] <= min(box["results"], box["view"]) and box["page"] <= box["view"], box
    assert driver.find_element(By.ID, "trade-totals").text.startswith("Totals")

    trade = closed[0]
    charts = _open(driver, f"{base}/dashboard/trades/{trade.pk}/", "trade")
    chart = charts["trade_chart"]
    entry = next(t for t in chart["traces"] if t["name"] == "entry marker")
    exit_ = next(t for t in chart["traces"] if t["name"] == "exit marker")
    assert entry["drawn"] == 1 and entry["y"] == [float(trade.entry_price)]
    assert datetime.fromisoformat(entry["x"][0]) == trade.opened_at
    assert exit_["drawn"] == 1 and exit_["y"] == [float(trade.exit_price)]
    assert datetime.fromisoformat(exit_["x"][0]) == trade.closed_at
    assert _points(chart, trade.instrument.inst_id) > 10  # the candles around it
    # The markers are drawn in the SVG, not only held in the figure's data.
    drawn = driver.execute_script(
        "const el = document.getElementById('fig-trade_chart');"
        "return Array.from(el.querySelectorAll('.scatterlayer .trace'))"
        "  .map(g => g.querySelectorAll('path.point').length);")
    assert sum(drawn) >= 2 + 1, drawn  # entry, exit and the deciding cycles' markers
    _open(driver, f"{base}/dashboard/cycles/{trade.cycle_id}/", "cycle")
    assert ARTIFACTS.joinpath("portfolio.png").stat().st_size > 10_000


def test_halt_from_the_dashboard_shows_in_bot_status_and_the_next_cycle_places_no_order(
        driver, live_server, trader, settings) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    import tradebot.tasks as stage_tasks
    from market.feeds.synthetic import SyntheticFeed
    from market.models import Instrument
    from market.services import instruments_sync
    from tradebot.cycle import cycle_open
    from tradebot.pipeline import pipeline_chain
    from tradebot.stages import StageEnv

    base = live_server.url
    _login(driver, base, "trader", "/dashboard/controls/")
    driver.find_element(By.CSS_SELECTOR, "#halt-form input[name=reason]").send_keys("FOMC in ten minutes")
    driver.find_element(By.CSS_SELECTOR, "#halt-form [type=submit]").click()
    _wait(driver, lambda d: d.find_element(By.ID, "bot-state").text == "HALTED")
    driver.save_screenshot(str(ARTIFACTS / "controls-halted.png"))
    out = StringIO()
    call_command("bot", "status", stdout=out)
    assert out.getvalue().startswith("state      HALTED")
    assert "by dashboard:trader: FOMC in ten minutes" in out.getvalue()

    # The next cycle, at a time the rules brain opens a long on this market (seed 7, test_pipeline_workers.py).
    settings.BRAIN = "rules"
    feed = SyntheticFeed(seed=7, end=datetime(2025, 9, 6, tzinfo=UTC), inst_ids=("BTC-USDT-SWAP",))
    instruments_sync(feed=feed, enable=["BTC-USDT-SWAP"])
    stage_tasks._ENV = StageEnv(feed=feed, exchange=None)  # noqa: SLF001 - what a worker builds once
    try:
        cycle = cycle_open(instrument=Instrument.objects.get(inst_id="BTC-USDT-SWAP"),
                           as_of=datetime(2025, 9, 5, 0, 30, tzinfo=UTC), trigger="test")
        pipeline_chain(cycle.pk).apply()
    finally:
        stage_tasks.env_reset()
        stage_tasks._CONTEXTS.clear()  # noqa: SLF001
    cycle.refresh_from_db()
    assert cycle.decision["decision"]["action"] == "OPEN_LONG"  # the brain wanted in ...
    assert cycle.outcome == CycleOutcome.HALTED and "FOMC in ten minutes" in cycle.reason  # ... the halt said no
    assert Order.objects.count() == 0 and Trade.objects.count() == 0


def test_a_user_who_is_not_staff_gets_the_login_page_and_a_post_without_csrf_is_refused(
        driver, live_server, trader) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    base = live_server.url
    viewer = User.objects.create_user("viewer", password=PASSWORD, is_staff=False)
    client = Client()
    client.force_login(viewer)  # a real session of a logged-in user who is not staff
    driver.add_cookie({"name": "sessionid", "value": client.cookies["sessionid"].value, "path": "/"})
    for page in ("portfolio", "controls", "health"):
        driver.get(f"{base}/dashboard/{page}/")
        assert driver.current_url.startswith(f"{base}/admin/login/?next=/dashboard/{page}/")
        assert driver.find_elements(By.ID, "login-form")
    driver.save_screenshot(str(ARTIFACTS / "not-staff-login.png"))

    driver.delete_all_cookies()
    _login(driver, base, "trader", "/dashboard/controls/")
    # The halt form without its CSRF token, as a forged cross-site form would be.
    driver.execute_script("document.querySelector('#halt-form [name=csrfmiddlewaretoken]').remove();")
    driver.find_element(By.CSS_SELECTOR, "#halt-form input[name=reason]").send_keys("forged")
    driver.find_element(By.CSS_SELECTOR, "#halt-form [type=submit]").click()
    _wait(driver, lambda d: "CSRF" in d.page_source)
    driver.save_screenshot(str(ARTIFACTS / "csrf-refused.png"))
    assert "403" in driver.page_source or "Forbidden" in driver.page_source
    assert not BotState.objects.filter(state=BotStatus.HALTED).exists()
