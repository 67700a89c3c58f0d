"""OKX unreachable with keys set (#16, defect 8): the stage fails fast, the cycle ends FAILED "exchange unreachable",
no entry is attempted, the outage is one journal event, and the instrument's next tick is not held back."""
from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta

from django.test import override_settings

from execution.models import Order
from journal.models import Cycle, CycleState, JournalEvent
from market.models import Instrument

S = CycleState
AT = datetime(2025, 9, 5, 0, 30, tzinfo=UTC)  # seed 7: an OPEN_LONG setup (test_pipeline_workers.py)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_unreachable_exchange_fails_the_cycle_at_once_and_never_blocks_the_next_tick(db, settings) -> None:
    import tradebot.tasks as stage_tasks
    from market.feeds.synthetic import SyntheticFeed
    from market.services import instruments_sync
    from tradebot.celery import app
    from tradebot.cycle import cycle_open
    from tradebot.pipeline import STAGE_TASK_NAMES
    from tradebot.stages import STAGES, StageEnv

    settings.BRAIN = "rules"
    feed = SyntheticFeed(seed=7)
    instruments_sync(feed=feed, enable=["BTC-USDT-SWAP"])
    btc = Instrument.objects.get(inst_id="BTC-USDT-SWAP")
    stage_tasks._ENV = StageEnv(feed=feed, exchange=None)  # noqa: SLF001 - what a worker builds once
    stage_tasks._PAPER_VENUE = None  # noqa: SLF001
    ended = []
    try:
        with override_settings(OKX_API_KEY="k" * 10, OKX_API_SECRET="s" * 10, OKX_PASSPHRASE="p" * 10,
                               OKX_BASE_URL=_closed_port(), OKX_MAX_RETRIES=3):
            for n in range(2):  # two ticks in a row: the second is not held back by the first
                cycle = cycle_open(instrument=btc, as_of=AT + timedelta(minutes=5 * n), trigger="beat")
                assert cycle.state == S.IDLE, cycle.reason
                app.tasks[STAGE_TASK_NAMES[STAGES[0][0]]].apply(args=(cycle.pk,)).get()  # COLLECTING: synthetic
                started = time.monotonic()
                app.tasks[STAGE_TASK_NAMES[STAGES[1][0]]].apply(args=(cycle.pk,)).get()  # SCREENING: the account, OKX
                ended.append(time.monotonic() - started)
                cycle.refresh_from_db()
                assert cycle.state == S.FAILED, (cycle.state, cycle.reason)
                assert cycle.reason.startswith("SCREENING failed: exchange unreachable (OKX connection failed"), \
                    cycle.reason
                assert "exchange-side stops" in cycle.reason
    finally:
        stage_tasks.env_reset()
        stage_tasks._CONTEXTS.clear()  # noqa: SLF001
    assert max(ended) < 3.0, ended  # no retries with backoff (they took ~8 s a cycle)
    assert not Order.objects.exists()  # no entry attempted
    assert JournalEvent.objects.filter(kind="exchange_unreachable").count() == 1  # one event per outage
    assert Cycle.objects.filter(state=S.SKIPPED).count() == 0
