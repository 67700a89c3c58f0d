"""The watchlist: CSV import/export (command and admin, django-import-export) and the top-N selection.

Instruments come from OKX's real /public/instruments?instType=SWAP capture
(2022-05-13, 166 swaps) served by the local OKX server; the tickers are the
real recorded SWAP ticker row re-addressed to each instrument.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import call_command
from django_celery_beat.models import PeriodicTask

from market.feeds.okx import OkxFeed
from market.models import Instrument
from market.services import instruments_sync
from market.watchlist import watchlist_export, watchlist_import, watchlist_top_n
from tests.fakes.http_server import FakeHttpServer
from tests.fakes.okx_market import INSTRUMENTS, TICKERS, OkxMarketFake

pytestmark = pytest.mark.django_db
CAPTURE = "public_instruments_SWAP.capture_cryptofeed_20220513.json"
TICKER_ROW = "ws_tickers.capture_cryptofeed_UNI-USD-SWAP_20220513.json"


@pytest.fixture(scope="module")
def okx_server() -> Iterator[FakeHttpServer]:
    with FakeHttpServer() as server:
        yield server


@pytest.fixture
def okx(okx_server: FakeHttpServer, okx_samples: Path, settings) -> OkxMarketFake:  # noqa: ANN001
    fake = OkxMarketFake(okx_server).reset()
    fake.sample(INSTRUMENTS, okx_samples / CAPTURE)
    settings.OKX_BASE_URL = fake.url
    return fake


@pytest.fixture
def swaps(okx: OkxMarketFake) -> list[str]:
    feed = OkxFeed(base_url=okx.url, timeout=2.0)
    try:
        return [i.inst_id for i in instruments_sync(feed=feed)]
    finally:
        feed.close()


def cycle_entries() -> set[str]:
    return set(PeriodicTask.objects.filter(name__startswith="cycle ", enabled=True).values_list("name", flat=True))


def enabled() -> set[str]:
    return set(Instrument.objects.filter(trading_enabled=True).values_list("inst_id", flat=True))


def test_import_with_bad_rows_reports_each_row_and_imports_the_good_ones(
        swaps, tmp_path, capsys) -> None:  # noqa: ANN001
    assert len(swaps) == 166 and "ETH-USDT-SWAP" in swaps
    path = tmp_path / "watchlist.csv"
    path.write_text("inst_id,enabled\n"
                    "BTC-USDT-SWAP,true\n"     # line 2: good
                    ",true\n"                   # line 3: empty
                    "FOO-USDT-SWAP,true\n"      # line 4: unknown
                    "BTC-USDT-SWAP,false\n"     # line 5: duplicate of line 2
                    " eth-usdt-swap ,\n"        # line 6: good (case and spaces; empty enabled = true)
                    "SOL-USDT-SWAP,maybe\n")    # line 7: enabled not a boolean
    with pytest.raises(SystemExit) as exit_:
        call_command("watchlist", "import", str(path))
    out, err = capsys.readouterr()
    assert exit_.value.code == 3
    assert enabled() == {"BTC-USDT-SWAP", "ETH-USDT-SWAP"}
    bad = [line for line in err.splitlines() if line.startswith("bad row")]
    assert len(bad) == 4, err
    assert "line 3" in bad[0] and "empty" in bad[0]
    assert "line 4" in bad[1] and "unknown instrument FOO-USDT-SWAP" in bad[1]
    assert "line 5" in bad[2] and "duplicate" in bad[2] and "line 2" in bad[2]
    assert "line 7" in bad[3] and "maybe" in bad[3]
    assert "enabled: 2" in out
    # The watchlist changed: beat has a cycle entry for each enabled instrument, no more.
    assert cycle_entries() == {"cycle BTC-USDT-SWAP", "cycle ETH-USDT-SWAP"}


def test_the_limit_replace_and_an_export_that_imports_back_unchanged(swaps, settings) -> None:  # noqa: ANN001
    settings.WATCHLIST_MAX_ENABLED = 2
    report = watchlist_import(data="inst_id\nBTC-USDT-SWAP\nETH-USDT-SWAP\nLTC-USDT-SWAP\n")
    assert report.enabled == ["BTC-USDT-SWAP", "ETH-USDT-SWAP"]
    assert [(p.line, p.inst_id) for p in report.problems] == [(4, "LTC-USDT-SWAP")]
    assert "over the limit" in report.problems[0].reason
    exported = watchlist_export()
    assert exported == "inst_id,enabled\nBTC-USDT-SWAP,true\nETH-USDT-SWAP,true\n"
    again = watchlist_import(data=exported)
    assert again.ok and again.enabled == [] and sorted(again.unchanged) == ["BTC-USDT-SWAP", "ETH-USDT-SWAP"]
    # --replace turns off what the file does not name; a dry run changes nothing.
    dry = watchlist_import(data="instId\nLTC-USDT-SWAP\n", replace=True, dry_run=True)
    assert dry.ok and dry.enabled == ["LTC-USDT-SWAP"] and sorted(dry.disabled) == ["BTC-USDT-SWAP", "ETH-USDT-SWAP"]
    assert enabled() == {"BTC-USDT-SWAP", "ETH-USDT-SWAP"}
    replaced = watchlist_import(data="instId\nLTC-USDT-SWAP\n", replace=True)
    assert replaced.ok and enabled() == {"LTC-USDT-SWAP"}
    assert cycle_entries() == {"cycle LTC-USDT-SWAP"}
    # A file with no good row never empties the watchlist.
    nothing = watchlist_import(data="inst_id\nNOPE-USDT-SWAP\n", replace=True)
    assert "nothing changed" in nothing.error and enabled() == {"LTC-USDT-SWAP"}
    assert "inst_id column" in watchlist_import(data="symbol\nBTC-USDT-SWAP\n").error


def test_the_admin_previews_bad_rows_and_imports_the_good_ones(
        swaps, client, django_user_model) -> None:  # noqa: ANN001
    from django.core.files.uploadedfile import SimpleUploadedFile

    admin = django_user_model.objects.create_superuser("admin", "a@example.com", "pw")
    client.force_login(admin)
    page = client.get("/admin/market/instrument/import/")
    assert page.status_code == 200
    csv_format = next(value for value, label in page.context["form"].fields["format"].choices if label == "csv")
    upload = SimpleUploadedFile("w.csv", b"inst_id,enabled\nBTC-USDT-SWAP,true\nFOO-USDT-SWAP,true\n,\n",
                                content_type="text/csv")
    preview = client.post("/admin/market/instrument/import/",
                          {"format": csv_format,
                           "import_file": upload, "resource": 0})
    assert preview.status_code == 200
    text = preview.content.decode()
    assert "unknown instrument FOO-USDT-SWAP" in text and "empty: no instrument id" in text
    confirm = preview.context["confirm_form"]
    assert enabled() == set()  # the preview is a dry run
    done = client.post("/admin/market/instrument/process_import/", {**confirm.initial, "resource": 0})
    assert done.status_code == 302
    assert enabled() == {"BTC-USDT-SWAP"} and cycle_entries() == {"cycle BTC-USDT-SWAP"}
    form = client.get("/admin/market/instrument/export/").context["form"]
    ticked = {name: "on" for name, f in form.fields.items() if getattr(f, "is_selectable_field", False)}
    # The admin exports its list as filtered: here the instruments that trade.
    exported = client.post("/admin/market/instrument/export/?trading_enabled__exact=1",
                           {"format": csv_format, "resource": 0, **ticked})
    assert exported.status_code == 200 and exported["Content-Type"].startswith("text/csv"), exported.content[:300]
    assert exported.content.decode().splitlines() == ["inst_id,enabled", "BTC-USDT-SWAP,1"]


def test_top_n_selection_against_the_local_okx_server(okx, okx_samples, swaps, settings) -> None:  # noqa: ANN001
    row = json.loads((okx_samples / TICKER_ROW).read_text())["data"][0]
    # (last, volCcy24h in base currency): the USDT volume is their product.
    okx.tickers(row, {
        "BTC-USD-SWAP": ("29000", "9000000"),       # the largest, but settled in BTC: never selected
        "DOGE-USDT-SWAP": ("0.08", "900000000"),    # 72 M USDT (the most coins, not the most USDT)
        "BTC-USDT-SWAP": ("29000", "40000"),        # 1,160 M USDT
        "ETH-USDT-SWAP": ("2000", "300000"),        # 600 M USDT
        "LTC-USDT-SWAP": ("60", "100000"),          # 6 M USDT
        "XRP-USDT-SWAP": ("0.4", "100000000"),      # 40 M USDT
        "NOPE-USDT-SWAP": ("1", "1e12"),            # not among the instruments OKX lists
    })
    Instrument.objects.filter(inst_id="ADA-USDT-SWAP").update(trading_enabled=True)  # a person's
    Instrument.objects.filter(inst_id__in=["LTC-USDT-SWAP", "XRP-USDT-SWAP"]).update(trading_enabled=True,
                                                                                     auto_selected=True)
    feed = OkxFeed(base_url=okx.url, timeout=2.0)
    try:
        report = watchlist_top_n(feed=feed, n=3, keep={"XRP-USDT-SWAP"})
    finally:
        feed.close()
    assert [i for i, _ in report.ranked] == ["BTC-USDT-SWAP", "ETH-USDT-SWAP", "DOGE-USDT-SWAP"]
    assert report.ranked[0][1] == Decimal("29000") * Decimal("40000")
    assert sorted(report.enabled) == ["BTC-USDT-SWAP", "DOGE-USDT-SWAP", "ETH-USDT-SWAP"]
    assert report.dropped == ["LTC-USDT-SWAP"] and report.kept == ["XRP-USDT-SWAP"]
    assert enabled() == {"ADA-USDT-SWAP", "BTC-USDT-SWAP", "DOGE-USDT-SWAP", "ETH-USDT-SWAP", "XRP-USDT-SWAP"}
    assert not Instrument.objects.get(inst_id="ADA-USDT-SWAP").auto_selected
    assert okx.calls(TICKERS)[0].query["instType"] == "SWAP"
    # The bound: with at most 3 trading, the command enables only what fits and says what it left out.
    Instrument.objects.update(trading_enabled=False, auto_selected=False)
    Instrument.objects.filter(inst_id="ADA-USDT-SWAP").update(trading_enabled=True)
    settings.WATCHLIST_MAX_ENABLED, settings.WATCHLIST_TOP_N = 3, 3
    call_command("watchlist", "top")
    assert enabled() == {"ADA-USDT-SWAP", "BTC-USDT-SWAP", "ETH-USDT-SWAP"}
    assert cycle_entries() == {f"cycle {i}" for i in enabled()}
    assert PeriodicTask.objects.get(name="watchlist top n").task == "tradebot.tasks.watchlist_refresh"
