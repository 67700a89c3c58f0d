"""Reads for execution: the bot's state, the account as the risk gate sees it, orders."""
from __future__ import annotations

from dataclasses import replace

from execution.exchanges.base import AccountState, Exchange, Position
from execution.models import DEMO_SCOPE, LIVE_SCOPE, BotState, Order
from execution.risk import BotStateView


def bot_scope(*, mode: str = "live", run_id: str = "") -> str:
    """The BotState row a mode/run uses: the live bot, the demo's, or one per replay run."""
    if mode == "live":
        return LIVE_SCOPE
    return DEMO_SCOPE if mode == "demo" else f"replay:{run_id}"[:80]


def bot_state_row(scope: str = LIVE_SCOPE) -> BotState:
    return BotState.objects.get_or_create(scope=scope)[0]


def bot_state(*, scope: str = LIVE_SCOPE) -> BotStateView:
    return bot_state_view(bot_state_row(scope))


def bot_state_view(row: BotState) -> BotStateView:
    """The view of a BotState row in hand (`bot_state` reads it first)."""
    return BotStateView(
        state=row.state, consecutive_losses=row.consecutive_losses, until=row.until, reason=row.reason, since=row.since,
        by=row.by, day_start_equity=row.day_start_equity, peak_equity=row.peak_equity,
    )


def account_state(*, exchange: Exchange, scope: str = LIVE_SCOPE, bot: BotStateView | None = None) -> AccountState:
    """The exchange's balances plus the day-start and peak equity the bot tracks.

    `bot`: the bot state the caller has just read (it carries the same two
    figures), which saves reading the row again.
    """
    return _with_bot_figures(exchange.account(), scope=scope, bot=bot)


def account_and_positions(
    *, exchange: Exchange, scope: str = LIVE_SCOPE, bot: BotStateView | None = None
) -> tuple[AccountState, list[Position]]:
    """`account_state` and `positions_open` together: from one read of the positions when the exchange can.

    The paper exchange computes the account from its positions, so one read serves
    both (and both describe the same moment); another exchange is asked twice.
    """
    both = getattr(exchange, "account_and_positions", None)
    if both is not None:
        account, positions = both()
    else:
        account, positions = exchange.account(), exchange.positions()
    return _with_bot_figures(account, scope=scope, bot=bot), positions


def _with_bot_figures(account: AccountState, *, scope: str, bot: BotStateView | None) -> AccountState:
    if bot is None:
        row = bot_state_row(scope)
        return replace(account, day_start_equity=row.day_start_equity, peak_equity=row.peak_equity)
    return replace(account, day_start_equity=bot.day_start_equity, peak_equity=bot.peak_equity)


def positions_open(*, exchange: Exchange) -> list[Position]:
    return exchange.positions()


def order_by_client_id(client_order_id: str) -> Order | None:
    return Order.objects.filter(client_order_id=client_order_id).first()


def orders_unsettled() -> list[Order]:
    """Orders whose final outcome we do not know yet."""
    return list(Order.objects.filter(state__in=["PENDING", "SUBMITTED", "PARTIALLY_FILLED"]).order_by("created_at"))
