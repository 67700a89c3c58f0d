"""The Celery app: queues, routing by module, JSON only, beat from the database.

Queues: `okx` (market data: COLLECTING, the watchlist refresh), `orders` (what places
or confirms an order and keeps the account true: EXECUTING/CONFIRMING, the account
sync, execution's own tasks), `llm` (brain), `reflection` (self-learning), `default`
(risk gate, journal). `orders` has its own worker so an approved order and the
account sync never wait behind a tick's COLLECTING tasks or a model call.
Tasks stay thin: they take ids, load rows, call one service and own only
retries and time limits.
"""
from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.signals import before_task_publish
from celery.worker.consumer import Consumer
from celery.worker.consumer.consumer import maybe_shutdown
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradebot.settings")

app = Celery("tradebot")
app.config_from_object("django.conf:settings", namespace="CELERY")

QUEUES = ("okx", "orders", "llm", "reflection", "default")
ORDERS_QUEUE = "orders"
# Tasks of this layer that place or confirm an order or reconcile the account (execution's own tasks go there by module).
ORDER_TASKS = frozenset({"tradebot.tasks.cycle_execute", "tradebot.tasks.account_sync"})


def route_task(name: str, args: object, kwargs: object, options: object, task: object = None, **kw: object) -> dict[str, str]:
    """Route by the module a task lives in, order tasks by name. A queue named by the sender wins (the pipeline's
    signatures name theirs; a retry is sent again to the queue it came from, a redelivery comes back on it)."""
    module = name.split(".", 1)[0]
    if name in ORDER_TASKS or module == "execution":
        return {"queue": ORDERS_QUEUE}
    if name.startswith("brain.reflection") or name.startswith("tradebot.tasks.reflection"):
        return {"queue": "reflection"}
    if module == "market":
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
    # django-celery-beat's DatabaseScheduler, surviving a database outage (tradebot.beat, #16).
    beat_scheduler="tradebot.beat:OutageProofScheduler",
    timezone="UTC",
    enable_utc=True,
    broker_connection_retry_on_startup=True,
    # A broker outage of any length: the worker reconnects forever (Celery's default gives up after 100 tries and
    # the worker exits), every half second to two seconds (see FastReconnectConsumer).
    broker_connection_retry=True,
    broker_connection_max_retries=None,
    worker_consumer="tradebot.celery:FastReconnectConsumer",
    # A send while the broker is down (beat's tick, a chain's next hop) retries for about 5 s, then fails with one log
    # line; a lost beat tick is recorded as a gap by the next cycle (tradebot.cycle.cycle_open).
    task_publish_retry=True,
    task_publish_retry_policy={"max_retries": 4, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 2},
    # Celery's Django fixup closes the database connection before and after EVERY task unless this
    # is set, so each stage paid a new PostgreSQL session (and its set-up) on top of its queries.
    # With it, the fixup closes only every this-many tasks; between tasks tradebot.tasks applies
    # Django's own request-boundary rule (drop a broken, too old or mid-transaction connection,
    # CONN_MAX_AGE) and drops the session outright if a cycle's advisory lock leaked.
    CELERY_DB_REUSE_MAX=1000,
)
app.autodiscover_tasks()

RECONNECT_INTERVALS = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


class FastReconnectConsumer(Consumer):
    """The worker's consumer, reconnecting to the broker every 0.5-2 s instead of kombu's 2-30 s.

    kombu's `ensure_connection` defaults (2 s, +2 s per attempt, up to 30 s) made the worker take ~12 s to come
    back after a 30 s Redis outage; Celery passes no interval of its own. Retries are endless
    (`broker_connection_max_retries=None`) and each failed attempt is one log line (Celery's own).
    """

    def ensure_connected(self, conn: Any) -> Any:
        def errback(exc: Exception, interval: float) -> None:
            self.broker_connection_retry_attempt += 1
            logging.getLogger("celery.worker.consumer").error(
                "broker unreachable (%s): %s; retrying in %.1fs (attempt %d)",
                conn.as_uri(), exc, interval, self.broker_connection_retry_attempt)

        conn = conn.ensure_connection(errback, None, callback=maybe_shutdown, **RECONNECT_INTERVALS)
        self.first_connection_attempt = False
        self.broker_connection_retry_attempt = 0
        return conn


class OneLineErrors(logging.Filter):
    """Beat's "Message Error" while the broker is down: one line with the error, not a traceback per tick."""

    def filter(self, record: logging.LogRecord) -> bool:
        # ERROR only: beat crashing (CRITICAL, "beat raised exception") keeps its traceback.
        if record.exc_info and record.levelno == logging.ERROR:
            exc = record.exc_info[1]
            record.msg = "beat could not send a task (the next cycle records the missed tick): %s: %s"
            record.args = (type(exc).__name__, exc)
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("celery.beat").addFilter(OneLineErrors())


def _outage_errors() -> tuple[type[BaseException], ...]:
    """What a lost database, broker or exchange raises (imported late: the filter is installed at import time)."""
    import kombu.exceptions
    import redis.exceptions
    from django.db import InterfaceError, OperationalError

    from execution.exchanges.base import ExchangeUnreachable

    return (OperationalError, InterfaceError, kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
            ExchangeUnreachable, ConnectionError)


class OutageOneLine(logging.Filter):
    """A task or the consumer failing because the database, the broker or the exchange is gone: one line with the
    error, not a traceback per failure (an outage of a minute otherwise printed dozens). Other errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            try:
                outage = isinstance(exc, _outage_errors())
            except Exception:  # noqa: BLE001 - Django not set up yet: leave the record as it is
                outage = False
            if outage:
                first = (str(exc).strip().splitlines() or [""])[0]
                record.msg = f"{record.getMessage()} [{type(exc).__name__}: {first}]"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


for _name in ("celery.app.trace", "celery.worker.consumer.consumer", "celery.worker.request",
              "django_celery_beat.schedulers"):
    logging.getLogger(_name).addFilter(OutageOneLine())

CYCLE_START_TASK = "tradebot.tasks.cycle_start"
SENT_AT_HEADER = "tb_sent_at"


def tick_stamp(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every cycle_start message carries the time it was first sent (kept on retries), so a late tick is known.

    Connected here, not in tradebot.tasks, so beat (which may send before importing the tasks) stamps too.
    """
    if sender == CYCLE_START_TASK and headers is not None:
        headers.setdefault(SENT_AT_HEADER, datetime.now(UTC).isoformat())


before_task_publish.connect(tick_stamp, weak=False)


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
