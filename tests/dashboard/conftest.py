"""A journal made by a short replay (synthetic market, rules brain), shared by the cockpit tests."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from market.feeds.synthetic import SyntheticFeed

INST = "BTC-USDT-SWAP"
FROM = datetime(2025, 8, 1, tzinfo=UTC)
TO = datetime(2025, 8, 3, tzinfo=UTC)
RUN = "cockpit-run"


@pytest.fixture(scope="session")
def cockpit_feed() -> SyntheticFeed:
    # Enough history before FROM for the indicator window; generated once per session.
    return SyntheticFeed(seed=7, start=datetime(2025, 6, 15, tzinfo=UTC), end=datetime(2025, 8, 5, tzinfo=UTC))


def replay_journal(feed: SyntheticFeed, run_id: str = RUN) -> str:
    from tradebot.replay import replay_run

    summary = replay_run(inst_id=INST, start=FROM, end=TO, feed=feed, run_id=run_id)
    assert summary.cycles > 500
    return run_id
