"""LLM cost: prices, the daily budget, and degrade mode.

Spending is the sum of `LlmCall.cost_usd` since 00:00 UTC (wall clock: it is
real money, replays included). At LLM_BUDGET_WARN_FRACTION of
LLM_DAILY_BUDGET_USD the journal gets one warning a day; at 100% the brain is
in degrade mode (LLM_DEGRADE_MODE: the rules brain, or HOLD) until the next
UTC day. Entering and leaving degrade mode are journal events and log lines.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta, timezone
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum

from journal.models import EventLevel, JournalEvent, LlmCall
from journal.services import event_record
import structlog

log = structlog.get_logger(__name__)
MILLION = Decimal(1_000_000)
KIND_WARNING = "llm_budget_warning"
KIND_DEGRADE = "llm_degrade_mode"
KIND_DEGRADE_END = "llm_degrade_mode_ended"


def model_prices(model: str) -> dict[str, Decimal]:
    """USD per million tokens; an unknown model is priced as the dearest known one."""
    table = settings.LLM_PRICES
    if model in table:
        return table[model]
    log.warning("llm_price_unknown", model=model, note="priced as the most expensive model in LLM_PRICES")
    return max(table.values(), key=lambda row: row.get("output", Decimal(0)))


def llm_cost(*, model: str, input_tokens: int, output_tokens: int, cache_write_tokens: int = 0, cache_read_tokens: int = 0) -> Decimal:
    """Cost in USD. Output tokens include thinking tokens (the API bills them as output)."""
    p = model_prices(model)
    total = (
        Decimal(input_tokens) * p["input"]
        + Decimal(output_tokens) * p["output"]
        + Decimal(cache_write_tokens) * p.get("cache_write", p["input"])
        + Decimal(cache_read_tokens) * p.get("cache_read", p["input"])
    )
    return (total / MILLION).quantize(Decimal("0.00000001"))


def _day_start(now: datetime) -> datetime:
    return datetime.combine(now.astimezone(timezone.utc).date(), time(0), tzinfo=timezone.utc)


def spent_today(*, now: datetime) -> Decimal:
    start = _day_start(now)
    total = LlmCall.objects.filter(created_at__gte=start, created_at__lt=start + timedelta(days=1)).aggregate(s=Sum("cost_usd"))["s"]
    return Decimal(total or 0)


def _event_today(kind: str, now: datetime) -> bool:
    start = _day_start(now)
    return JournalEvent.objects.filter(kind=kind, created_at__gte=start, created_at__lt=start + timedelta(days=1)).exists()


@dataclass(frozen=True)
class BudgetState:
    spent: Decimal
    budget: Decimal
    degraded: bool

    @property
    def fraction(self) -> Decimal:
        return self.spent / self.budget if self.budget > 0 else Decimal(0)


def budget_check(*, now: datetime) -> BudgetState:
    """Where today's spending stands; records the 80% warning and degrade mode once a day.

    `now` is wall-clock UTC (tests pass another day to see the mode end).
    """
    budget = settings.LLM_DAILY_BUDGET_USD
    spent = spent_today(now=now)
    # A budget of 0 means "no LLM spending at all": always degraded.
    degraded = spent >= budget
    state = BudgetState(spent=spent, budget=budget, degraded=degraded)
    data = {"spent_usd": str(spent), "budget_usd": str(budget), "day": _day_start(now).date().isoformat()}
    if degraded:
        if not _event_today(KIND_DEGRADE, now):
            event_record(
                kind=KIND_DEGRADE,
                level=EventLevel.WARNING,
                message=f"LLM budget exhausted: ${spent} of ${budget} today; degrade mode ({settings.LLM_DEGRADE_MODE}) until 00:00 UTC",
                data={**data, "mode": settings.LLM_DEGRADE_MODE},
            )
        return state
    if budget > 0 and state.fraction >= settings.LLM_BUDGET_WARN_FRACTION and not _event_today(KIND_WARNING, now):
        event_record(
            kind=KIND_WARNING,
            level=EventLevel.WARNING,
            message=f"LLM spending at {state.fraction:.0%} of the daily budget (${spent} of ${budget})",
            data=data,
        )
    _note_degrade_ended(now=now, data=data)
    return state


def _note_degrade_ended(*, now: datetime, data: dict) -> None:
    # Degrade mode from an earlier day that has not been closed yet: say it ended.
    last = JournalEvent.objects.filter(kind=KIND_DEGRADE, created_at__lt=_day_start(now)).order_by("-created_at").first()
    if last is None:
        return
    if JournalEvent.objects.filter(kind=KIND_DEGRADE_END, created_at__gt=last.created_at).exists():
        return
    event_record(kind=KIND_DEGRADE_END, message="New UTC day: LLM degrade mode ended, the LLM brain is back", data=data)
