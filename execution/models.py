"""Execution state: orders with an explicit state machine, the bot's state, the
live-trading confirmation, and the paper exchange's book (account, positions,
orders, fills, funding) so a restart loses nothing.

Every state change of an `Order` or `BotState` goes through `transition()`
below, which enforces the allowed-transitions tables in one place.
"""
from __future__ import annotations

from datetime import datetime, timezone as dt_timezone
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from typing import Any

from django.db import models

from journal.models import Cycle, Mode

MONEY = {"max_digits": 28, "decimal_places": 10}


@cache
def _read_forms(model: type[models.Model]) -> tuple[list[tuple[str, Decimal]], list[str]]:
    """The model's decimal fields with their column's quantum, and its datetime fields."""
    fields = model._meta.concrete_fields
    decimals = [(f.attname, Decimal(1).scaleb(-f.decimal_places)) for f in fields if isinstance(f, models.DecimalField)]
    return decimals, [f.attname for f in fields if isinstance(f, models.DateTimeField)]


def row_as_read[M: models.Model](row: M) -> M:
    """Give a row the values a read of it would: decimals at the column's scale (the database rounds
    half away from zero), datetimes in UTC.

    For a row this process wrote and keeps instead of reading it back (the paper exchange's
    exclusive book, an order just settled): what is built from it (positions, approvals,
    journal rows) prints its values, so it must hold exactly what the read would have given.
    """
    decimals, datetimes = _read_forms(type(row))
    for name, quantum in decimals:
        value = getattr(row, name)
        if value is not None:
            setattr(row, name, value.quantize(quantum, rounding=ROUND_HALF_UP))
    for name in datetimes:
        value = getattr(row, name)
        if value is not None:
            setattr(row, name, value.astimezone(dt_timezone.utc))
    return row


class InvalidTransition(Exception):
    """A state change that the transitions table does not allow."""


class OrderState(models.TextChoices):
    PENDING = "PENDING"  # the row exists; the exchange call may or may not have gone out
    SUBMITTED = "SUBMITTED"  # the exchange acknowledged it
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    REJECTED = "REJECTED"
    CANCELED = "CANCELED"


ORDER_TRANSITIONS: dict[str, frozenset[str]] = {
    # PENDING -> REJECTED/FILLED directly: the exchange answered the very call that sent it.
    OrderState.PENDING: frozenset({OrderState.SUBMITTED, OrderState.REJECTED, OrderState.CANCELED}),
    OrderState.SUBMITTED: frozenset({OrderState.FILLED, OrderState.PARTIALLY_FILLED, OrderState.CANCELED, OrderState.REJECTED}),
    OrderState.PARTIALLY_FILLED: frozenset({OrderState.PARTIALLY_FILLED, OrderState.FILLED, OrderState.CANCELED}),
    OrderState.FILLED: frozenset(),
    OrderState.REJECTED: frozenset(),
    OrderState.CANCELED: frozenset(),
}
TERMINAL_ORDER_STATES = frozenset(s for s, nxt in ORDER_TRANSITIONS.items() if not nxt)


class Order(models.Model):
    """One order we sent (or meant to send), keyed by its client order id."""

    client_order_id = models.CharField(max_length=32, unique=True)
    exchange_order_id = models.CharField(max_length=64, blank=True, default="")
    exchange = models.CharField(max_length=20, help_text="paper or okx")
    cycle = models.ForeignKey(Cycle, null=True, blank=True, on_delete=models.SET_NULL, related_name="orders")
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    run_id = models.CharField(max_length=64, blank=True, default="")
    inst_id = models.CharField(max_length=40, db_index=True)
    action = models.CharField(max_length=12)
    side = models.CharField(max_length=4)
    pos_side = models.CharField(max_length=5)
    order_type = models.CharField(max_length=6)
    size = models.DecimalField(**MONEY, help_text="Contracts")
    price = models.DecimalField(**MONEY, null=True, blank=True, help_text="Limit price")
    stop_loss = models.DecimalField(**MONEY, null=True, blank=True)
    take_profit = models.DecimalField(**MONEY, null=True, blank=True)
    leverage = models.DecimalField(max_digits=8, decimal_places=2, default=Decimal("1"))
    reduce_only = models.BooleanField(default=False)
    state = models.CharField(max_length=16, choices=OrderState.choices, default=OrderState.PENDING, db_index=True)
    filled_size = models.DecimalField(**MONEY, default=Decimal("0"))
    avg_fill_price = models.DecimalField(**MONEY, null=True, blank=True)
    fee = models.DecimalField(**MONEY, default=Decimal("0"), help_text="Fee paid (positive = cost)")
    error_code = models.CharField(max_length=20, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    approved = models.JSONField(default=dict, help_text="The approved order as the risk gate built it")
    trade_context = models.JSONField(default=dict, blank=True)
    history = models.JSONField(default=list, blank=True, help_text="[{from, to, at, note}]")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        # A run's orders on one instrument, newest first (the close order a sync looks for): the inst_id
        # index alone read every run's orders on the instrument (see journal.Trade's trade_run_open). And a
        # run's orders in a state (a sync's unsettled ones), which would otherwise read all the run's orders.
        indexes = [models.Index(fields=["run_id", "mode", "inst_id", "created_at"], name="order_run_inst_created"),
                   models.Index(fields=["run_id", "mode", "state"], name="order_run_state")]

    def __str__(self) -> str:
        return f"order {self.client_order_id} {self.action} {self.inst_id} {self.state}"


class BotStatus(models.TextChoices):
    RUNNING = "RUNNING"
    HALTED = "HALTED"  # daily loss: resumes by itself at the next UTC day
    EMERGENCY_HALT = "EMERGENCY_HALT"  # drawdown from peak: only a person resumes
    COOLDOWN = "COOLDOWN"  # consecutive losses: resumes after `until`


BOT_TRANSITIONS: dict[str, frozenset[str]] = {
    BotStatus.RUNNING: frozenset({BotStatus.HALTED, BotStatus.EMERGENCY_HALT, BotStatus.COOLDOWN}),
    BotStatus.HALTED: frozenset({BotStatus.RUNNING, BotStatus.HALTED, BotStatus.EMERGENCY_HALT}),
    BotStatus.COOLDOWN: frozenset({BotStatus.RUNNING, BotStatus.COOLDOWN, BotStatus.HALTED, BotStatus.EMERGENCY_HALT}),
    BotStatus.EMERGENCY_HALT: frozenset({BotStatus.RUNNING}),
}


LIVE_SCOPE = "live"
DEMO_SCOPE = "demo"  # `manage.py demo`'s bot (BOT_MODE=demo)


class BotState(models.Model):
    """The bot-wide state: one row per scope. "live" is the bot; each replay run gets its own
    ("replay:<run_id>") so a replay can never halt, cool down or reset the live bot."""

    scope = models.CharField(max_length=80, unique=True, default=LIVE_SCOPE)
    state = models.CharField(max_length=16, choices=BotStatus.choices, default=BotStatus.RUNNING)
    reason = models.TextField(blank=True, default="")
    since = models.DateTimeField(null=True, blank=True)
    by = models.CharField(max_length=100, blank=True, default="")
    until = models.DateTimeField(null=True, blank=True, help_text="HALTED/COOLDOWN end by themselves at this time")
    consecutive_losses = models.IntegerField(default=0)
    day_start_equity = models.DecimalField(**MONEY, null=True, blank=True)
    day_start_date = models.DateField(null=True, blank=True)
    peak_equity = models.DecimalField(**MONEY, null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"bot {self.state}"


class LiveTradingConfirmation(models.Model):
    """A person confirmed that real money may be traded (`manage.py bot confirm-live`)."""

    by = models.CharField(max_length=100)
    confirmed_at = models.DateTimeField()
    note = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-confirmed_at", "-id"]


def transition(obj: Order | BotState, to: str, *, table: dict[str, frozenset[str]], now: datetime, note: str = "") -> None:
    """Move `obj.state` to `to` if the table allows it; the one place states change.

    The caller saves the row. Orders keep a history of their transitions.
    """
    current = obj.state
    if to not in table.get(current, frozenset()):
        raise InvalidTransition(f"{type(obj).__name__} cannot go from {current} to {to}")
    obj.state = to
    if isinstance(obj, Order):
        entry: dict[str, Any] = {"from": current, "to": to, "at": now.isoformat()}
        if note:
            entry["note"] = note
        obj.history = [*obj.history, entry]


# --- The paper exchange's book --------------------------------------------
class PaperAccount(models.Model):
    """Cash = deposits + realised PnL - fees + funding (isolated margin stays inside cash)."""

    name = models.CharField(max_length=40, unique=True, default="default",
                            help_text="default: the live bot (make run); demo: make demo; a replay run id")
    cash = models.DecimalField(**MONEY)
    # Which clock the account's prices follow, fixed by its first price: "wall" (a live bot: real time) or
    # "virtual" (a replay, the demo, a test's fixed times). The two never mix in one account (#16).
    clock = models.CharField(max_length=8, blank=True, default="", help_text="wall or virtual (set by the first price)")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)


class PaperPrice(models.Model):
    """Last price, clock and funding rate per instrument, so the clock survives a restart."""

    account = models.ForeignKey(PaperAccount, on_delete=models.CASCADE, related_name="prices")
    inst_id = models.CharField(max_length=40)
    last = models.DecimalField(**MONEY, null=True, blank=True)
    ts = models.DateTimeField(null=True, blank=True)
    funding_rate = models.DecimalField(**MONEY, null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["account", "inst_id"], name="paper_price_unique")]


class PaperPosition(models.Model):
    account = models.ForeignKey(PaperAccount, on_delete=models.CASCADE, related_name="positions")
    inst_id = models.CharField(max_length=40)
    pos_side = models.CharField(max_length=5)  # long / short
    status = models.CharField(max_length=6, default="open", db_index=True)  # open / closed
    size = models.DecimalField(**MONEY, help_text="Contracts still open")
    max_size = models.DecimalField(**MONEY, help_text="Largest size the position reached")
    avg_px = models.DecimalField(**MONEY)
    leverage = models.DecimalField(max_digits=8, decimal_places=2)
    margin = models.DecimalField(**MONEY, help_text="Isolated margin")
    stop_loss = models.DecimalField(**MONEY, null=True, blank=True)
    take_profit = models.DecimalField(**MONEY, null=True, blank=True)
    opened_at = models.DateTimeField()
    closed_at = models.DateTimeField(null=True, blank=True)
    last_funding_at = models.DateTimeField()
    close_avg_px = models.DecimalField(**MONEY, null=True, blank=True)
    closed_size = models.DecimalField(**MONEY, default=Decimal("0"))
    realized_pnl = models.DecimalField(**MONEY, default=Decimal("0"), help_text="Price PnL of closed contracts")
    fees = models.DecimalField(**MONEY, default=Decimal("0"), help_text="Fees paid, positive = cost")
    funding = models.DecimalField(**MONEY, default=Decimal("0"), help_text="Funding received (+) / paid (-)")
    liq_penalty = models.DecimalField(**MONEY, default=Decimal("0"))
    close_reason = models.CharField(max_length=20, blank=True, default="")
    open_client_order_id = models.CharField(max_length=32, blank=True, default="")

    class Meta:
        ordering = ["opened_at", "id"]
        # An account's positions closed since a time (every account sync asks): the account index alone read
        # all the positions the account ever closed.
        indexes = [models.Index(fields=["account", "status", "closed_at"], name="paperpos_account_closed")]


class PaperOrder(models.Model):
    account = models.ForeignKey(PaperAccount, on_delete=models.CASCADE, related_name="orders")
    client_order_id = models.CharField(max_length=32)
    inst_id = models.CharField(max_length=40)
    side = models.CharField(max_length=4)
    pos_side = models.CharField(max_length=5)
    ord_type = models.CharField(max_length=6)
    size = models.DecimalField(**MONEY)
    price = models.DecimalField(**MONEY, null=True, blank=True)
    stop_loss = models.DecimalField(**MONEY, null=True, blank=True)
    take_profit = models.DecimalField(**MONEY, null=True, blank=True)
    leverage = models.DecimalField(max_digits=8, decimal_places=2, default=Decimal("1"))
    reduce_only = models.BooleanField(default=False)
    state = models.CharField(max_length=16, default="live")  # live, filled, canceled, rejected (OKX words)
    filled_size = models.DecimalField(**MONEY, default=Decimal("0"))
    avg_px = models.DecimalField(**MONEY, null=True, blank=True)
    fee = models.DecimalField(**MONEY, default=Decimal("0"))
    reserved_margin = models.DecimalField(**MONEY, default=Decimal("0"))
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [models.UniqueConstraint(fields=["account", "client_order_id"], name="paper_order_clordid_unique")]
        # An account's live (resting) orders, per instrument: asked at every bar the paper market processes; the
        # account index alone read every order the account ever placed.
        indexes = [models.Index(fields=["account", "state", "inst_id"], name="paperorder_account_state")]


class PaperFill(models.Model):
    """Every fill: opening, closing, stop, take-profit, liquidation."""

    account = models.ForeignKey(PaperAccount, on_delete=models.CASCADE, related_name="fills")
    order = models.ForeignKey(PaperOrder, null=True, blank=True, on_delete=models.SET_NULL, related_name="fills")
    position = models.ForeignKey(PaperPosition, on_delete=models.CASCADE, related_name="fills")
    inst_id = models.CharField(max_length=40)
    side = models.CharField(max_length=4)
    kind = models.CharField(max_length=12)  # open, close, stop_loss, take_profit, liquidation
    size = models.DecimalField(**MONEY)
    price = models.DecimalField(**MONEY)
    fee = models.DecimalField(**MONEY, help_text="Positive = cost")
    pnl = models.DecimalField(**MONEY, default=Decimal("0"))
    ts = models.DateTimeField()

    class Meta:
        ordering = ["ts", "id"]


class PaperFunding(models.Model):
    account = models.ForeignKey(PaperAccount, on_delete=models.CASCADE, related_name="fundings")
    position = models.ForeignKey(PaperPosition, on_delete=models.CASCADE, related_name="fundings")
    inst_id = models.CharField(max_length=40)
    ts = models.DateTimeField()
    rate = models.DecimalField(**MONEY)
    price = models.DecimalField(**MONEY)
    amount = models.DecimalField(**MONEY, help_text="Received (+) / paid (-)")

    class Meta:
        ordering = ["ts", "id"]
