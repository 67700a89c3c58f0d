"""The live bot's learning loop is wired: beat -> deep reflection -> validation, and a review -> the same chain."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from brain.models import PlaybookStatus, PlaybookVersion
from brain.playbook import playbook_current
from journal.models import ReflectionLog, ReflectionType, Trade, TradeStatus
from market.models import Instrument

BTC = "BTC-USDT-SWAP"


@pytest.fixture
def instrument(db) -> Instrument:
    return Instrument.objects.create(inst_id=BTC, ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
                                     tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True)


@pytest.fixture
def eager():
    """Run queued tasks in-process (Celery's eager mode), as a worker would, without a broker."""
    from tradebot.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


@pytest.fixture
def learning_settings(settings):
    settings.BRAIN = "rules"
    settings.ANTHROPIC_API_KEY = ""
    settings.REFLECTION_INTERVAL_TRADES = 6
    settings.PLAYBOOK_VALIDATION_DAYS = 1
    settings.PLAYBOOK_VALIDATION_CYCLE_SECONDS = 3600
    settings.INDICATOR_HISTORY_CANDLES = 200
    settings.INSTRUMENTS = [BTC]
    return settings


@pytest.fixture
def stored_candles(instrument, learning_settings) -> None:
    """A few days of (synthetic) candles in the database: what validation replays when it runs in a worker."""
    from market.feeds.synthetic import SyntheticFeed
    from market.services import candles_upsert

    # Validation replays the days before now, so the stored candles end at the last full hour.
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    feed = SyntheticFeed(seed=7, start=end - timedelta(days=40), end=end)
    feed.set_clock(end)
    for tf, n in (("15m", 4 * 24 * 3), ("1H", 24 * 12), ("4H", 6 * 40)):
        candles_upsert(instrument=instrument, timeframe=tf, bars=feed.candles(BTC, tf, limit=n))


def losing_trades(instrument: Instrument, n: int) -> list[Trade]:
    # Closed within the last hours: only the trade count can make the reflection due, not the 6 h timer.
    start = datetime.now(UTC) - timedelta(hours=2)
    trades = []
    for i in range(n):
        opened = start + timedelta(minutes=10 * i)
        trades.append(Trade.objects.create(
            instrument=instrument, opened_at=opened, closed_at=opened + timedelta(minutes=5), direction="LONG",
            entry_price=Decimal("70000"), exit_price=Decimal("69500"), stop_loss=Decimal("69500"), take_profit=Decimal("71000"),
            size=Decimal("1"), pnl_usd=Decimal("-25"), strategy_used="momentum_breakout", market_regime="volatile",
            confidence_at_entry=Decimal("0.6"), exit_reason="stop_loss", status=TradeStatus.CLOSED, reasoning="breakout",
        ))
    return trades


def test_beat_runs_the_deep_reflection_check_on_the_reflection_queue(instrument, learning_settings) -> None:
    import tradebot.tasks  # noqa: F401 - registers the tasks, as a worker's autodiscovery does
    from tradebot.beat import beat_sync
    from tradebot.celery import app

    entries = {e.name: e for e in beat_sync()}
    deep = entries["deep reflection"]
    assert deep.task == "tradebot.tasks.reflection_deep" and deep.queue == "reflection"
    assert deep.interval.every == 3600 and deep.enabled
    assert "tradebot.tasks.reflection_deep" in app.tasks and "tradebot.tasks.reflection_playbook_validate" in app.tasks


def test_the_beat_task_reflects_when_due_and_the_candidate_is_validated_next(stored_candles, eager, instrument) -> None:
    from tradebot.tasks import reflection_deep

    v1 = playbook_current()
    assert reflection_deep.apply().get() is None  # no trades: not due, nothing happens
    assert not ReflectionLog.objects.filter(reflection_type=ReflectionType.PERIODIC).exists()
    losing_trades(instrument, 6)
    candidate_id = reflection_deep.apply().get()
    candidate = PlaybookVersion.objects.get(pk=candidate_id)
    assert candidate.triggered_by == "reflection" and candidate.parent_version == v1.version
    assert candidate.playbook["strategy_definitions"]["momentum_breakout"]["params"]["enabled"] is False
    # Validation ran right after (queued on the reflection queue; eager here): decided, with its figures.
    assert candidate.validation["verdict"] in ("promoted", "rejected", "waiting") and candidate.validation["reason"]
    assert candidate.validation["window"]["source"] == "database"
    assert candidate.validation["window"]["cycle_seconds"] == 3600
    assert candidate.validation["candidate"]["version"] == candidate.version


def test_a_post_trade_review_triggers_the_due_deep_reflection_and_its_validation(stored_candles, eager, instrument) -> None:
    from tradebot.tasks import reflection_trade_review

    trades = losing_trades(instrument, 6)
    # Trades close one by one (account sync queues a review for each): hide the later ones until "closed".
    Trade.objects.filter(pk__in=[t.pk for t in trades]).update(status=TradeStatus.OPEN)
    for trade in trades[:-1]:
        Trade.objects.filter(pk=trade.pk).update(status=TradeStatus.CLOSED)
        reflection_trade_review.apply(args=(trade.pk,)).get()
    # Five of six: the trade interval is not reached; reviews only.
    assert ReflectionLog.objects.filter(reflection_type=ReflectionType.POST_TRADE, status="done").count() == 5
    assert PlaybookVersion.objects.count() == 1
    Trade.objects.filter(pk=trades[-1].pk).update(status=TradeStatus.CLOSED)
    reflection_trade_review.apply(args=(trades[-1].pk,)).get()
    deep = ReflectionLog.objects.get(reflection_type=ReflectionType.PERIODIC)
    assert deep.status == "done" and sorted(deep.trade_ids) == sorted(t.pk for t in trades)
    candidate = PlaybookVersion.objects.get(version=deep.new_version)
    assert candidate.validation["verdict"] in ("promoted", "rejected", "waiting") and candidate.validation["reason"]
