"""`manage.py replay`'s backtest report and `--trades-csv`, against the journal the replay wrote."""
from __future__ import annotations

import csv
import json
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from journal.models import Mode, Trade, TradeStatus

INST = "BTC-USDT-SWAP"
ARGS = ("replay", "--inst", INST, "--from", "2025-08-01", "--to", "2025-08-03", "--synthetic")


@pytest.mark.django_db
def test_the_printed_report_and_the_trades_csv_are_the_runs_trades(tmp_path: Path, settings) -> None:
    path = tmp_path / "trades.csv"
    out = StringIO()
    call_command(*ARGS, "--trades-csv", str(path), stdout=out, stderr=StringIO())
    summary, report = out.getvalue().split("\n\n", 1)
    run_id = dict(line.split(None, 1) for line in summary.splitlines())["run_id"]
    trades = list(Trade.objects.filter(mode=Mode.REPLAY, run_id=run_id).order_by("opened_at", "id"))
    closed = [t for t in trades if t.status == TradeStatus.CLOSED]
    assert closed, "the window must close trades for the report to mean something"

    rows = list(csv.DictReader(path.open()))
    assert [int(r["id"]) for r in rows] == [t.id for t in trades]
    assert [Decimal(r["pnl_usd"]) for r in rows if r["pnl_usd"]] == [t.pnl_usd for t in trades if t.pnl_usd is not None]

    for section in ("TRADES", "RESULTS PER INSTRUMENT", "RESULTS PER STRATEGY", "RESULTS PER EXIT REASON",
                    "RESULTS PER DAY", "RESULTS PER MONTH", "SUMMARY"):
        assert f"==== {section}" in report
    final = Decimal(settings.PAPER_START_BALANCE) + sum((t.pnl_usd for t in closed), Decimal(0))
    assert f"final balance              {final.quantize(Decimal('0.01')):,} USDT" in report
    assert "(cycle snapshots)" in report  # a synthetic replay stores no candles: buy-and-hold from its cycles
    trade_lines = report.split("==== TRADES", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    assert [int(line.split()[0]) for line in trade_lines] == [t.id for t in trades]


@pytest.mark.django_db
def test_the_json_summary_is_unchanged_by_the_report_and_the_csv_still_written(tmp_path: Path) -> None:
    path = tmp_path / "trades.csv"
    out = StringIO()
    call_command(*ARGS, "--json", "--trades-csv", str(path), stdout=out, stderr=StringIO())
    data = json.loads(out.getvalue())  # one JSON object, nothing else on stdout
    assert {"run_id", "cycles", "trades", "closed_trades", "pnl_usd", "max_drawdown_pct"} <= set(data)
    assert len(path.read_text().splitlines()) == data["trades"] + 1


@pytest.mark.django_db
def test_a_trades_csv_that_cannot_be_written_is_an_error_naming_the_path_and_the_run(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "trades.csv"
    with pytest.raises(CommandError, match=rf"cannot write {target}: .*\(run id replay-"):
        call_command(*ARGS, "--json", "--trades-csv", str(target), stdout=StringIO(), stderr=StringIO())
