"""The views the brain may see of the execution side: positions, the account and the recent trades, as frozen
brain.schemas objects (the brain never sees execution's or the journal's rows). The stages' BrainContext and the
replay's run state are built from these."""
from __future__ import annotations

from typing import Any

from django.db import connections, router
from django.db.models import TextField
from django.db.models.functions import Cast

from brain.reflection import trade_view_from_row
from brain.schemas import AccountView, PositionView, TradeView
from journal.models import Trade

RECENT_TRADES = 20


def position_view(position: Any, strategy: str = "") -> PositionView:
    return PositionView(
        inst_id=position.inst_id,
        side="short" if position.pos_side == "short" else "long",
        size=position.size,
        notional_usd=position.notional_usd,
        entry_price=position.avg_px,
        unrealized_pnl=position.unrealized_pnl,
        leverage=position.leverage,
        stop_loss=position.stop_loss,
        take_profit=position.take_profit,
        opened_at=position.opened_at,
        strategy_used=strategy,
    )


def account_view(account: Any) -> AccountView:
    return AccountView(
        equity=account.equity,
        available_balance=account.available_balance,
        day_start_equity=account.day_start_equity if account.day_start_equity is not None else account.equity,
        peak_equity=account.peak_equity if account.peak_equity is not None else account.equity,
    )


# The Trade columns a TradeView shows besides its JSON ones, and `updated_at` (every save bumps it):
# when none changed, neither did the view.
_TRADE_KEY = (
    "updated_at", "status", "opened_at", "closed_at", "direction", "entry_price", "exit_price", "stop_loss",
    "take_profit", "size_pct", "leverage", "pnl_usd", "pnl_pct", "fees_usd", "strategy_used", "confidence_at_entry",
    "market_regime", "exit_reason", "playbook_version", "reasoning", "instrument_id",
)


class TradeViews:
    """The last trades of one (mode, run) as TradeViews, converting only the rows that changed.

    A full read of 20 trades with their JSON columns (indicators, research) and
    their conversion to views was most of SCREENING's own time (~9 ms here); a
    light read of the scalar columns says which of the last trades are new or
    changed (a close changes status, exit and PnL with them), and only those are
    read in full. Each read asks the database, so another worker's trade counts
    at once.
    """

    def __init__(self, *, mode: str, run_id: str, limit: int = RECENT_TRADES) -> None:
        self.mode, self.run_id, self.limit = mode, run_id, limit
        self._keys: dict[int, tuple[Any, ...]] = {}  # id -> its key columns when converted
        self._views: dict[int, TradeView] = {}
        self._light: tuple[str, str, tuple[Any, ...]] | None = None  # (database alias, SQL, params)

    def _light_rows(self) -> list[tuple[Any, ...]]:
        """(id, *_TRADE_KEY) of the last `limit` trades, as the database driver returns them.

        The SQL is compiled once per instance: compiling the queryset cost about as much
        as running it, on every live SCREENING. The key columns come as text (the driver
        turning 20 rows of decimals and times into Python objects took as long as the
        query) and skip Django's converters: they are only compared with the same read's
        earlier values, never shown.
        """
        alias = router.db_for_read(Trade)
        if self._light is None or self._light[0] != alias:
            rows = Trade.objects.using(alias).filter(mode=self.mode, run_id=self.run_id).order_by("-opened_at", "-id")
            as_text = {f"key_{name}": Cast(name, TextField()) for name in _TRADE_KEY}
            sql, params = rows.annotate(**as_text).values_list("id", *as_text)[: self.limit].query.sql_with_params()
            self._light = (alias, sql, tuple(params))
        _, sql, params = self._light
        with connections[alias].cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()

    def read(self) -> list[TradeView]:
        keys = {row[0]: row for row in self._light_rows()}
        changed = [pk for pk, key in keys.items() if self._keys.get(pk) != key]
        if changed:
            for trade in Trade.objects.filter(pk__in=changed).select_related("instrument"):
                self._views[trade.pk] = trade_view_from_row(trade)
        # A row read light but gone before the full read (deleted in between) is left out.
        self._keys = {pk: key for pk, key in keys.items() if pk in self._views}
        self._views = {pk: self._views[pk] for pk in self._keys}
        return [self._views[pk] for pk in self._keys]


# Live: one per (mode, run) in each worker process (a few KB of views each).
_TRADE_VIEWS: dict[tuple[str, str], TradeViews] = {}


def recent_trades(*, mode: str, run_id: str, limit: int = RECENT_TRADES) -> list[TradeView]:
    """The last `limit` trades of the run, newest first, as the brain sees them."""
    views = _TRADE_VIEWS.get((mode, run_id))
    if views is None or views.limit != limit:
        views = _TRADE_VIEWS[(mode, run_id)] = TradeViews(mode=mode, run_id=run_id, limit=limit)
    return views.read()
