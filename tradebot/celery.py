"""The Celery app: queues, routing by module, JSON only, beat from the database.

Queues: `okx` (market and execution: anything that talks to the exchange),
`llm` (brain), `reflection` (self-learning), `default` (risk gate, journal).
Tasks stay thin: they take ids, load rows, call one service and own only
retries and time limits.
"""
from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradebot.settings")

app = Celery("tradebot")
app.config_from_object("django.conf:settings", namespace="CELERY")

QUEUES = ("okx", "llm", "reflection", "default")


def route_task(name: str, args: object, kwargs: object, options: object, task: object = None, **kw: object) -> dict[str, str]:
    """Route by the module a task lives in; the pipeline may still name a queue."""
    module = name.split(".", 1)[0]
    if name.startswith("brain.reflection") or name.startswith("tradebot.tasks.reflection"):
        return {"queue": "reflection"}
    if module in ("market", "execution"):
        return {"queue": "okx"}
    if module == "brain":
        return {"queue": "llm"}
    return {"queue": "default"}


app.conf.update(
    task_queues=[Queue(q) for q in QUEUES],
    task_default_queue="default",
    task_routes=(route_task,),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_hijack_root_logger=False,
    beat_scheduler="django_celery_beat.schedulers:DatabaseScheduler",
    timezone="UTC",
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    # Celery's Django fixup closes the database connection before and after EVERY task unless this
    # is set, so each stage paid a new PostgreSQL session (and its set-up) on top of its queries.
    # With it, the fixup closes only every this-many tasks; between tasks tradebot.tasks applies
    # Django's own request-boundary rule (drop a broken, too old or mid-transaction connection,
    # CONN_MAX_AGE) and drops the session outright if a cycle's advisory lock leaked.
    CELERY_DB_REUSE_MAX=1000,
)
app.autodiscover_tasks()


def _routine_task_lines_at_debug(**_: object) -> None:
    """"Task received" / "succeeded" for every stage and the 15-second account sync, and each HTTP request
    line, flood a console: they show at LOG_LEVEL=DEBUG only. Failures and retries' errors still show."""
    import logging

    from django.conf import settings

    if getattr(settings, "LOG_LEVEL", "INFO") != "DEBUG":
        for name in ("celery.app.trace", "celery.worker.strategy", "httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _connect_logging_signals() -> None:
    from celery.signals import after_setup_logger, worker_process_init

    after_setup_logger.connect(_routine_task_lines_at_debug, weak=False)
    worker_process_init.connect(_routine_task_lines_at_debug, weak=False)


_connect_logging_signals()
