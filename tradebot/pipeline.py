"""The Celery chain for one instrument's cycle, one task per stage, each on its queue.

COLLECTING (okx) -> SCREENING (llm) -> RESEARCHING (llm) -> ANALYZING (llm)
-> RISK_CHECK (default) -> EXECUTING/CONFIRMING (orders) -> JOURNALING (default).

Signatures are immutable (`si`): every task takes the cycle id and reads the
rest from the Cycle row, so a redelivered task needs nothing from its parent.
A stage that ends the cycle cuts the rest of the chain.
"""
from __future__ import annotations

from datetime import datetime

from celery import chain
from celery.canvas import Signature
from django.utils import timezone

from journal.models import Cycle, CycleState, Mode
from market.models import Instrument
from tradebot.celery import app
from tradebot.cycle import cycle_open
from tradebot.logging import get_logger
from tradebot.stages import STAGES

log = get_logger(__name__)

# Task name per stage (the task bodies are in tradebot.tasks).
STAGE_TASK_NAMES: dict[str, str] = {
    CycleState.COLLECTING: "tradebot.tasks.cycle_collect",
    CycleState.SCREENING: "tradebot.tasks.cycle_screen",
    CycleState.RESEARCHING: "tradebot.tasks.cycle_research",
    CycleState.ANALYZING: "tradebot.tasks.cycle_analyze",
    CycleState.RISK_CHECK: "tradebot.tasks.cycle_risk_check",
    CycleState.EXECUTING: "tradebot.tasks.cycle_execute",
    CycleState.JOURNALING: "tradebot.tasks.cycle_journal",
}


_tasks_imported = False


def _tasks_import() -> None:
    """Register the stage tasks in this process.

    `app.autodiscover_tasks()` imports the apps' task modules only when a worker
    starts (Celery's import_modules signal). Any other process that builds the
    chain (`manage.py bot run-cycle`, the dashboard's "run one cycle now") had
    never imported tradebot.tasks, so the first signature ended in
    NotRegistered('tradebot.tasks.cycle_collect'). Celery's own loader call
    runs the same autodiscovery here.
    """
    global _tasks_imported
    if not _tasks_imported:
        app.loader.import_default_modules()
        _tasks_imported = True


def stage_signature(stage: str, cycle_id: int) -> Signature:
    _tasks_import()
    queue = dict((s, q) for s, _, q in STAGES)[stage]
    return app.signature(STAGE_TASK_NAMES[stage], args=(cycle_id,), immutable=True).set(queue=queue)


def pipeline_chain(cycle_id: int) -> chain:
    """The whole cycle as one chain; each stage routed to its queue explicitly."""
    return chain(*(stage_signature(stage, cycle_id) for stage, _, _ in STAGES))


def cycle_launch(
    *, instrument: Instrument, as_of: datetime | None = None, trigger: str = "beat", mode: str = Mode.LIVE,
    sent_at: datetime | None = None, tick_every: int | None = None,
) -> Cycle:
    """Open the instrument's next cycle and send its chain; a SKIPPED cycle sends nothing (see `cycle_open`)."""
    cycle = cycle_open(instrument=instrument, as_of=as_of or timezone.now(), mode=mode, trigger=trigger,
                       sent_at=sent_at, tick_every=tick_every)
    if cycle.state == CycleState.SKIPPED:
        return cycle
    pipeline_chain(cycle.pk).apply_async()
    log.info("cycle_launched", cycle_id=cycle.pk, inst_id=instrument.inst_id, trigger=trigger)
    return cycle
