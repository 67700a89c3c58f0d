"""What a replay keeps between its cycles (tradebot/replay.py's loop, and the bulk path of
tradebot/replay_bulk.py): the run's state, the walk of the paper exchange through the bars, the
account syncs and the day's reset, and the compact snapshot a cycle that did not act keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from journal.models import Mode
from tradebot.brain_views import TradeViews
from tradebot.stages import StageEnv


@dataclass
class RunState:
    """What the loop remembers between cycles instead of asking the database every cycle."""

    run_id: str
    exchange: Any = None
    scope: str = ""
    bot: Any = None  # the run's bot state (execution.risk.BotStateView); None = read it again
    trades: list[Any] = field(default_factory=list)
    trades_stale: bool = True  # a trade opened or closed since `trades` was read
    trade_views: Any = None  # tradebot.brain_views.TradeViews of this run (made on first use)
    synced: bool = False
    closes_synced: int = 0  # the paper exchange's close count at the last account sync
    peak_synced: Decimal | None = None  # the highest equity an account sync has seen
    last_day: Any = None  # the UTC date of the last cycle (a new one starts the risk gate's day)
    # The exchange account and its open positions at this cycle's prices until an order changes
    # them: the sync check and the brain's context read them, and both run before the cycle's own
    # order (reset per cycle).
    balances: Any = None
    positions: list[Any] = field(default_factory=list)
    # The latest cycle's snapshot (for a stop's or take-profit's exit indicators): a MarketSnapshot, or the
    # bulk path's tradebot.replay_bulk.MarketAt (the same views, without the model).
    last_snapshot: Any = None
    learn: Any = None  # replay --learn: tradebot.replay_learn.ReplayLearner, told after each cycle
    bulk: Any = None  # tradebot.replay_bulk.BulkCycles: writes the determined cycles (None: --per-cycle)

    def bot_view(self) -> Any:
        """`execution.selectors.bot_state` of this run, read again only after something changed it."""
        from execution.selectors import bot_state

        if self.bot is None:
            self.bot = bot_state(scope=self.scope)
        return self.bot

    def account(self) -> tuple[Any, list[Any]]:
        """`execution.selectors.account_and_positions` of this run, without re-reading an unchanged bot state."""
        bot = self.bot_view()
        balances = self.balances_now()
        return (dataclass_replace(balances, day_start_equity=bot.day_start_equity, peak_equity=bot.peak_equity),
                self.positions)

    def balances_now(self) -> Any:
        """The exchange's account at this cycle's prices, computed once per cycle with its positions (see _run_batch)."""
        if self.balances is None:
            self.balances, self.positions = self.exchange.account_and_positions()
        return self.balances

    def exit_indicators(self, inst_id: str, closed_at: datetime) -> dict[str, Any] | None:
        """The indicators of the last cycle's snapshot at a close the exchange made, as a live account
        sync takes them from that cycle's row (`execution.sync._exit_indicators`): the replay's rows
        are written per batch, and most keep a compact snapshot."""
        from execution.sync import EXIT_SNAPSHOT_MAX_AGE

        snapshot = self.last_snapshot
        if snapshot is None or snapshot.inst_id != inst_id:
            return None
        if not closed_at - EXIT_SNAPSHOT_MAX_AGE <= snapshot.ts <= closed_at:
            return None
        return {tf: view.indicators.model_dump(mode="json") for tf, view in snapshot.timeframes.items()}

    def recent_trades(self) -> list[Any]:
        """`tradebot.brain_views.recent_trades` of this run, read again only after a trade opened or closed."""
        if self.trades_stale:
            if self.trade_views is None:
                self.trade_views = TradeViews(mode=Mode.REPLAY, run_id=self.run_id)
            self.trades = self.trade_views.read()
            self.trades_stale = False
        return self.trades


class BarWalker:
    """Feeds the paper exchange every base bar up to the clock while it holds something.

    Flat, only the last bar matters (market orders fill at its close). Before the bars,
    the exchange gets the feed's funding rate at the clock (the rate settled at the last
    00/08/16 UTC), so a position held across a settlement pays or receives it.
    """

    def __init__(self, feed: Any, inst_id: str, timeframe: str, exchange: Any, start: datetime) -> None:
        self.feed = feed
        self.series = feed.series(inst_id, timeframe)
        self.inst_id = inst_id
        self.exchange = exchange
        self.tf_ms = self.series.tf_ms
        self.next_i = int(self.series.closed_end(int(start.timestamp() * 1000)))
        self.funding: Decimal | None = None  # the rate last given to the exchange
        self.funding_set = False

    def advance(self, until: datetime, exposed: bool) -> None:
        end = self.series.closed_end(int(until.timestamp() * 1000))
        if exposed:
            self._funding_at(until)
            for i in range(self.next_i, end):
                self.exchange.process_bar(self.inst_id, self.series.bar(i))
        elif end > self.next_i:
            self.exchange.process_bar(self.inst_id, self.series.bar(end - 1))
        self.next_i = max(self.next_i, end)

    def _funding_at(self, until: datetime) -> None:
        self.feed.set_clock(until)
        rate = self.feed.funding_rate(self.inst_id).rate
        # The exchange charges the rate it was last given at each settlement: only a new rate is news.
        if not self.funding_set or rate != self.funding:
            self.exchange.set_funding_rate(self.inst_id, rate)
            self.funding, self.funding_set = rate, True


def compact_snapshot(snapshot: Any) -> dict[str, Any]:
    """What a cycle that ended at screening keeps of its snapshot (a MarketSnapshot or a replay_bulk.MarketAt)."""
    return {
        "compact": True,
        "inst_id": snapshot.inst_id,
        "ts": snapshot.ts.isoformat(),
        "price": str(snapshot.price),
        "regime": snapshot.regime,
        "price_change_1h_pct": snapshot.price_change_1h_pct,
        "funding_rate": None if snapshot.funding_rate is None else str(snapshot.funding_rate),
        "anomalies": list(snapshot.anomalies.reasons),
    }


def sync_if_needed(env: StageEnv, run: RunState) -> None:
    """`account_sync` when it can change something (a position closed, the first time); a new
    equity peak alone only raises the bot state's peak.

    Between those, a sync of this run would only re-read the same numbers (no order is in
    flight in a replay: the paper exchange settles each order within `order_place`).
    """
    from execution.bot import bot_peak_raise
    from execution.sync import account_sync

    exchange = env.exchange
    equity = run.balances_now().equity
    if run.synced and exchange.closes == run.closes_synced and run.peak_synced is not None:
        if equity > run.peak_synced:
            # Only a new peak: all a sync would change is the bot state's peak equity.
            raised = bot_peak_raise(equity=equity, scope=env.scope)
            # Raised: memory takes what the UPDATE wrote, without reading the row again.
            run.bot = dataclass_replace(run.bot, peak_equity=equity) if raised and run.bot is not None else None
            run.peak_synced = equity
        return
    result = account_sync(exchange=exchange, mode=Mode.REPLAY, run_id=env.run_id, exit_indicators=run.exit_indicators)
    run.bot = None
    run.synced, run.closes_synced = True, exchange.closes
    run.peak_synced = equity if run.peak_synced is None else max(run.peak_synced, equity)
    if result.closed_trade_ids:
        run.trades_stale = True


def new_day(as_of: datetime, env: StageEnv, run: RunState) -> None:
    """00:00 UTC, as the live beat does it: the risk gate's day starts with the equity then."""
    from execution.bot import risk_daily_reset

    if as_of.date() == run.last_day:
        return
    run.last_day = as_of.date()
    midnight = as_of.replace(hour=0, minute=0, second=0, microsecond=0)
    run.bot = risk_daily_reset(now=midnight, equity=run.balances_now().equity, scope=env.scope)

