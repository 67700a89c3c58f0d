"""Every beat tick is accounted for: late, out-of-order and missed ticks are SKIPPED cycles with the reason (#16)."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from journal.models import Cycle, CycleOutcome, CycleState
from market.models import Instrument
from tradebot.cycle import cycle_open

S = CycleState
EVERY = 300


@pytest.fixture
def btc(db) -> Instrument:
    return Instrument.objects.create(
        inst_id="BTC-USDT-SWAP", ct_val=Decimal("0.01"), lot_sz=Decimal("0.01"), min_sz=Decimal("0.01"),
        tick_sz=Decimal("0.1"), max_lever=Decimal("100"), trading_enabled=True,
    )


def tick(btc: Instrument, sent: datetime, now: datetime | None = None) -> Cycle:
    cycle = cycle_open(instrument=btc, as_of=sent, sent_at=sent, tick_every=EVERY, now=now or sent)
    if cycle.state == S.IDLE:  # as if it ran: the next tick is not blocked
        Cycle.objects.filter(pk=cycle.pk).update(state=S.DONE, outcome=CycleOutcome.NO_SIGNAL)
    return cycle


def test_a_tick_sent_more_than_one_interval_ago_is_recorded_skipped_as_late(btc: Instrument) -> None:
    t0 = timezone.now() - timedelta(hours=1)
    tick(btc, t0)
    late = tick(btc, t0 + timedelta(seconds=EVERY), now=t0 + timedelta(seconds=EVERY * 2 + 1))
    assert late.state == S.SKIPPED and late.reason.startswith("late: the tick was sent 301s ago")


def test_a_tick_for_a_time_before_the_newest_cycle_is_recorded_skipped_as_out_of_order(btc: Instrument) -> None:
    newer = cycle_open(instrument=btc, as_of=datetime(2025, 1, 1, 6, 15, tzinfo=UTC))
    Cycle.objects.filter(pk=newer.pk).update(state=S.DONE)
    old = cycle_open(instrument=btc, as_of=datetime(2025, 1, 1, 6, 0, tzinfo=UTC))
    assert old.state == S.SKIPPED and f"out of order: a tick for 2025-01-01T06:00:00+00:00 after cycle {newer.pk}" in old.reason


def test_ticks_that_never_arrived_are_one_gap_row_with_their_count_before_the_next_cycle(btc: Instrument) -> None:
    t0 = timezone.now() - timedelta(hours=2)
    first = tick(btc, t0)
    after_outage = tick(btc, t0 + timedelta(seconds=4 * EVERY + 3))  # three ticks lost (e.g. Redis down)
    assert after_outage.state == S.IDLE
    gap = Cycle.objects.exclude(pk__in=[first.pk, after_outage.pk]).get()
    assert gap.state == S.SKIPPED and gap.stage_times == {"trigger": "gap", "missed_ticks": 3}
    assert gap.as_of == t0 + timedelta(seconds=EVERY) and "3 tick(s)" in gap.reason and "never ran" in gap.reason
    # The next on-time tick records no gap.
    tick(btc, t0 + timedelta(seconds=5 * EVERY))
    assert Cycle.objects.filter(stage_times__trigger="gap").count() == 1


def test_a_stage_past_its_own_time_limit_is_interrupted_not_after_seven_limits(btc: Instrument, settings) -> None:
    settings.CELERY_TASK_TIME_LIMIT = 60
    settings.CYCLE_STAGE_GRACE_SECONDS = 5
    now = timezone.now()
    stuck = cycle_open(instrument=btc, as_of=now - timedelta(seconds=300), now=now - timedelta(seconds=300))
    started = (now - timedelta(seconds=66)).isoformat()
    Cycle.objects.filter(pk=stuck.pk).update(state=S.COLLECTING, stage_times={"COLLECTING": {"started": started}})
    nxt = cycle_open(instrument=btc, as_of=now, now=now)
    stuck.refresh_from_db()
    assert nxt.state == S.IDLE and stuck.state == S.INTERRUPTED
    assert stuck.reason == "stale: still COLLECTING 66s after the stage started (its limit 65s)"


def test_a_stage_resumed_recently_still_blocks_the_instrument(btc: Instrument, settings) -> None:
    settings.CELERY_TASK_TIME_LIMIT = 60
    now = timezone.now()
    stuck = cycle_open(instrument=btc, as_of=now - timedelta(seconds=300), now=now - timedelta(seconds=300))
    Cycle.objects.filter(pk=stuck.pk).update(state=S.EXECUTING, stage_times={"EXECUTING": {
        "started": (now - timedelta(seconds=200)).isoformat(), "resumed": (now - timedelta(seconds=5)).isoformat()}})
    nxt = cycle_open(instrument=btc, as_of=now, now=now)
    assert nxt.state == S.SKIPPED and f"previous cycle {stuck.pk} still EXECUTING" in nxt.reason
