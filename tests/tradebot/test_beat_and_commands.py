"""Beat entries, performance snapshots and `manage.py bot status`."""
from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from journal.models import PerformanceSnapshot, Trade
from market.models import Instrument


@pytest.fixture
def instruments(db) -> list[Instrument]:
    spec = dict(ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"), tick_sz=Decimal("0.1"))
    return [Instrument.objects.create(inst_id="BTC-USDT-SWAP", trading_enabled=True, **spec),
            Instrument.objects.create(inst_id="ETH-USDT-SWAP", trading_enabled=False, **spec)]


def test_beat_has_one_expiring_cycle_entry_per_enabled_instrument_and_the_periodic_jobs(instruments, settings) -> None:
    from django_celery_beat.models import PeriodicTask

    from tradebot.beat import beat_sync

    settings.DECISION_CYCLE_SECONDS = 300
    entries = {e.name: e for e in beat_sync()}
    cycle = entries["cycle BTC-USDT-SWAP"]
    assert cycle.task == "tradebot.tasks.cycle_start" and json.loads(cycle.args) == ["BTC-USDT-SWAP"]
    assert cycle.interval.every == 300 and cycle.expire_seconds is None and cycle.queue == "default"
    assert "cycle ETH-USDT-SWAP" not in entries
    assert entries["account sync"].queue == "orders" and entries["account sync"].interval.every == settings.ACCOUNT_SYNC_SECONDS
    assert {entries[f"performance {p}"].queue for p in ("hourly", "daily", "weekly")} == {"reflection"}
    reset = entries["risk daily reset"].crontab
    assert (reset.minute, reset.hour) == ("0", "0")
    # Turning an instrument off disables its entry; a second sync changes nothing else.
    Instrument.objects.filter(inst_id="BTC-USDT-SWAP").update(trading_enabled=False)
    beat_sync()
    assert PeriodicTask.objects.get(name="cycle BTC-USDT-SWAP").enabled is False
    assert PeriodicTask.objects.filter(name__startswith="performance").count() == 3


def test_a_performance_snapshot_summarises_the_trades_closed_in_the_period(instruments) -> None:
    from tradebot.performance import performance_snapshot_record

    now = timezone.now()
    for pnl, hours_ago in ((Decimal("30"), 1), (Decimal("-10"), 2), (Decimal("20"), 30)):
        Trade.objects.create(instrument=instruments[0], opened_at=now - timedelta(hours=hours_ago + 1),
                             closed_at=now - timedelta(hours=hours_ago) + timedelta(minutes=1), direction="LONG",
                             entry_price=Decimal("1"), stop_loss=Decimal("0.9"), size=Decimal("1"), pnl_usd=pnl, status="closed")
    snap = performance_snapshot_record(period="daily", now=now)
    assert snap.total_trades == 2 and snap.total_pnl == Decimal("20")
    assert snap.win_rate == Decimal("0.5") and snap.profit_factor == Decimal("3")
    assert snap.playbook_version == 1
    weekly = performance_snapshot_record(period="weekly", now=now)
    assert weekly.total_trades == 3 and PerformanceSnapshot.objects.count() == 2
    with pytest.raises(ValueError):
        performance_snapshot_record(period="monthly")


def test_bot_status_reports_state_equity_cycles_and_queues(instruments, tmp_path, settings) -> None:
    out = StringIO()
    call_command("bot", "status", "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["state"] == "RUNNING" and report["exchange"] == "paper"
    assert Decimal(report["equity"]) == settings.PAPER_START_BALANCE
    assert report["last_cycles"][0]["inst_id"] == "BTC-USDT-SWAP" and report["last_cycles"][0]["cycle"] is None
    assert set(report["queues"]) == {"okx", "orders", "llm", "reflection", "default"}
    call_command("bot", "halt", "--reason", "checking", "--by", "tester", stdout=StringIO())
    out = StringIO()
    call_command("bot", "status", stdout=out)
    assert "HALTED" in out.getvalue() and "checking" in out.getvalue()


def test_confirm_live_needs_the_exact_phrase(instruments, settings, monkeypatch) -> None:
    from django.core.management.base import CommandError

    from execution.models import LiveTradingConfirmation

    settings.OKX_LIVE_TRADING = True
    monkeypatch.setattr("sys.stdin", StringIO("yes\n"))
    with pytest.raises(CommandError, match="did not match"):
        call_command("bot", "confirm-live", "--by", "ops", stdout=StringIO())
    assert not LiveTradingConfirmation.objects.exists()
    monkeypatch.setattr("sys.stdin", StringIO("I understand this trades real money\n"))
    call_command("bot", "confirm-live", "--by", "ops", stdout=StringIO())
    assert LiveTradingConfirmation.objects.get().by == "ops"


def test_account_syncs_that_failed_while_the_database_was_down_are_journaled_once_and_counted_in_bot_status(
        instruments, monkeypatch) -> None:
    from django.db import OperationalError

    import execution.sync
    from journal.models import JournalEvent
    from tradebot import tasks

    def db_down(**_):  # noqa: ANN003, ANN202 - what psycopg raises with PostgreSQL stopped
        raise OperationalError("connection refused")

    monkeypatch.setattr(execution.sync, "account_sync", db_down)
    assert tasks.account_sync.run() == [] and tasks.account_sync.run() == []
    assert not JournalEvent.objects.filter(kind="account_sync_failed").exists()  # the database "was down"
    monkeypatch.undo()
    tasks.account_sync.run()  # the database answers again: the two failures become one event
    event = JournalEvent.objects.get(kind="account_sync_failed")
    assert event.data["count"] == 2 and "2 account sync(s) failed" in event.message
    out = StringIO()
    call_command("bot", "status", stdout=out)
    assert "account syncs failed (24 h)  2" in out.getvalue()
