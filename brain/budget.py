"""LLM cost: prices, the daily budget, and degrade mode.

Live spending is the sum of `LlmCall.cost_usd` since 00:00 UTC on the wall
clock (every call is real money, replays' included). A replay has a budget of
its own on its virtual clock: the calls of that run whose cycle's `as_of` falls
in the replayed UTC day, so a 3-day replay has three budget days however long
it runs (`budget_check(mode="replay", run_id=...)`). At LLM_BUDGET_WARN_FRACTION of
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

from journal.models import EventLevel, JournalEvent, LlmCall, Mode
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


def spent_today(*, now: datetime, run_id: str = "") -> Decimal:
    """Spending on `now`'s UTC day: live on the wall clock; a replay run (`run_id`) on its cycles' virtual times."""
    start = _day_start(now)
    if run_id:
        calls = LlmCall.objects.filter(cycle__run_id=run_id, cycle__as_of__gte=start, cycle__as_of__lt=start + timedelta(days=1))
    else:
        calls = LlmCall.objects.filter(created_at__gte=start, created_at__lt=start + timedelta(days=1))
    return Decimal(calls.aggregate(s=Sum("cost_usd"))["s"] or 0)


def _event_today(kind: str, now: datetime, run_id: str = "") -> bool:
    start = _day_start(now)
    if run_id:  # a replay's events are dated by its virtual day, kept in their data
        return JournalEvent.objects.filter(kind=kind, data__run_id=run_id, data__day=start.date().isoformat()).exists()
    return JournalEvent.objects.filter(kind=kind, created_at__gte=start, created_at__lt=start + timedelta(days=1),
                                       mode=Mode.LIVE).exists()


@dataclass(frozen=True)
class BudgetState:
    spent: Decimal
    budget: Decimal
    degraded: bool

    @property
    def fraction(self) -> Decimal:
        return self.spent / self.budget if self.budget > 0 else Decimal(0)


def budget_check(*, now: datetime, mode: str = Mode.LIVE, run_id: str = "") -> BudgetState:
    """Where today's spending stands; records the 80% warning and degrade mode once a day.

    Live: `now` is wall-clock UTC (tests pass another day to see the mode end).
    A replay (`mode="replay"` with its `run_id`): `now` is the cycle's virtual time
    and the day is that run's own (see the module docstring).
    """
    run_id = run_id if mode == Mode.REPLAY else ""
    budget = settings.LLM_DAILY_BUDGET_USD
    spent = spent_today(now=now, run_id=run_id)
    # A budget of 0 means "no LLM spending at all": always degraded.
    degraded = spent >= budget
    state = BudgetState(spent=spent, budget=budget, degraded=degraded)
    data = {"spent_usd": str(spent), "budget_usd": str(budget), "day": _day_start(now).date().isoformat()}
    record_mode = Mode.LIVE
    if run_id:
        data["run_id"], record_mode = run_id, Mode.REPLAY
    whose = f"replay {run_id} on {data['day']}" if run_id else "today"
    cents = Decimal("0.01")  # the messages go to a phone (Telegram alerts): dollars and cents
    spent_text, budget_text = spent.quantize(cents), Decimal(budget).quantize(cents)
    if degraded:
        if not _event_today(KIND_DEGRADE, now, run_id):
            event_record(
                kind=KIND_DEGRADE,
                level=EventLevel.WARNING,
                message=f"LLM budget exhausted: ${spent_text} of ${budget_text} {whose}; degrade mode "
                        f"({settings.LLM_DEGRADE_MODE}) until 00:00 UTC",
                data={**data, "mode": settings.LLM_DEGRADE_MODE}, mode=record_mode,
            )
        return state
    if budget > 0 and state.fraction >= settings.LLM_BUDGET_WARN_FRACTION and not _event_today(KIND_WARNING, now, run_id):
        event_record(
            kind=KIND_WARNING,
            level=EventLevel.WARNING,
            message=f"LLM spending at {state.fraction:.0%} of the daily budget (${spent_text} of ${budget_text}, {whose})",
            data=data, mode=record_mode,
        )
    if not run_id:
        _note_degrade_ended(now=now, data=data)
    return state


def _note_degrade_ended(*, now: datetime, data: dict) -> None:
    # Degrade mode from an earlier day that has not been closed yet: say it ended.
    last = JournalEvent.objects.filter(kind=KIND_DEGRADE, mode=Mode.LIVE, created_at__lt=_day_start(now)).order_by("-created_at").first()
    if last is None:
        return
    if JournalEvent.objects.filter(kind=KIND_DEGRADE_END, created_at__gt=last.created_at).exists():
        return
    event_record(kind=KIND_DEGRADE_END, message="New UTC day: LLM degrade mode ended, the LLM brain is back", data=data)
