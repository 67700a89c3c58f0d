"""Beat entries in the database (django-celery-beat), so a person can edit them in the admin.

`beat_sync()` makes the entries match the instruments and settings: one cycle
entry per `Instrument.trading_enabled` every `DECISION_CYCLE_SECONDS` (a tick
that waited more than one interval is recorded SKIPPED, see `cycle_open`),
account sync every `ACCOUNT_SYNC_SECONDS`, the deep-reflection check hourly,
performance snapshots hourly,
daily and weekly, and the daily risk reset at 00:00 UTC; with WATCHLIST_TOP_N > 0 the daily top-N selection. Entries of
instruments no longer enabled are disabled, not deleted, so admin edits to
them survive. Only the schedule, task and queue are rewritten; an entry a
person disabled in the admin stays disabled.
"""
from __future__ import annotations

import json
import logging
import time

from django.conf import settings
from django.db import InterfaceError, OperationalError, transaction
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
from django_celery_beat.schedulers import DatabaseScheduler

from market.models import Instrument

CYCLE_PREFIX = "cycle "
CYCLE_TASK = "tradebot.tasks.cycle_start"
WATCHLIST_ENTRY = "watchlist top n"


def _interval(seconds: int) -> IntervalSchedule:
    schedule, _ = IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)
    return schedule


def _crontab(*, minute: str, hour: str, day_of_week: str = "*") -> CrontabSchedule:
    schedule, _ = CrontabSchedule.objects.get_or_create(
        minute=minute, hour=hour, day_of_week=day_of_week, day_of_month="*", month_of_year="*", timezone="UTC"
    )
    return schedule


def _entry(name: str, *, task: str, queue: str, args: list[object] | None = None, description: str = "", **schedule: object) -> PeriodicTask:
    entry = PeriodicTask.objects.filter(name=name).first()
    fields = {"task": task, "queue": queue, "args": json.dumps(args or []), "description": description,
              "interval": None, "crontab": None, **schedule}
    if entry is None:
        return PeriodicTask.objects.create(name=name, enabled=True, **fields)
    for key, value in fields.items():
        setattr(entry, key, value)
    entry.save()
    return entry


@transaction.atomic
def beat_sync() -> list[PeriodicTask]:
    """Create or update every entry; returns the enabled ones."""
    cycle_every = settings.DECISION_CYCLE_SECONDS
    entries: list[PeriodicTask] = []
    enabled_names = set()
    for inst in Instrument.objects.filter(trading_enabled=True):
        name = f"{CYCLE_PREFIX}{inst.inst_id}"
        enabled_names.add(name)
        entries.append(_entry(
            name, task=CYCLE_TASK, queue="default", args=[inst.inst_id], interval=_interval(cycle_every),
            # No expiry: a tick that waited more than an interval is recorded SKIPPED ("late") by cycle_start, not
            # dropped unseen by the worker.
            expire_seconds=None, description=f"Decision cycle for {inst.inst_id} every {cycle_every}s",
        ))
    # Instruments turned off: their entries stop, a person's edits stay.
    PeriodicTask.objects.filter(name__startswith=CYCLE_PREFIX, task=CYCLE_TASK).exclude(name__in=enabled_names).update(enabled=False)
    entries.append(_entry(
        "account sync", task="tradebot.tasks.account_sync", queue="orders", interval=_interval(settings.ACCOUNT_SYNC_SECONDS),
        expire_seconds=settings.ACCOUNT_SYNC_SECONDS, description="Positions, balance and closed trades from the exchange",
    ))
    for period, cron in (
        ("hourly", {"minute": "0", "hour": "*"}),
        ("daily", {"minute": "5", "hour": "0"}),
        ("weekly", {"minute": "10", "hour": "0", "day_of_week": "1"}),
    ):
        entries.append(_entry(
            f"performance {period}", task="tradebot.tasks.reflection_performance_snapshot", queue="reflection",
            args=[period], crontab=_crontab(**cron), expire_seconds=None, description=f"{period} performance snapshot",
        ))
    # The deep reflection's timer: an hourly check; `deep_reflection_due` applies the
    # REFLECTION_INTERVAL_TRADES / REFLECTION_INTERVAL_HOURS rule (an exact 6 h beat could
    # fire a moment before "6 h since the last one" and then wait 12 h).
    entries.append(_entry(
        "deep reflection", task="tradebot.tasks.reflection_deep", queue="reflection", interval=_interval(3600),
        expire_seconds=3600, description=(f"Deep reflection every {settings.REFLECTION_INTERVAL_TRADES} closed trades or "
                                          f"{settings.REFLECTION_INTERVAL_HOURS} h; a candidate playbook is then validated by replay"),
    ))
    entries.append(_entry(
        "risk daily reset", task="tradebot.tasks.risk_daily_reset", queue="default",
        crontab=_crontab(minute="0", hour="0"), expire_seconds=3600,
        description="Day-start equity for the daily loss limit; ends a daily-loss HALT",
    ))
    # The watchlist's daily top-N selection (issue 20), only while WATCHLIST_TOP_N asks for one.
    if settings.WATCHLIST_TOP_N > 0:
        entries.append(_entry(
            WATCHLIST_ENTRY, task="tradebot.tasks.watchlist_refresh", queue="okx",
            crontab=_crontab(minute="10", hour=str(settings.WATCHLIST_TOP_N_HOUR)), expire_seconds=3600,
            description=f"Enable the top {settings.WATCHLIST_TOP_N} USDT swaps by 24-hour volume on OKX "
                        f"(at most WATCHLIST_MAX_ENABLED={settings.WATCHLIST_MAX_ENABLED} trade)",
        ))
    else:
        PeriodicTask.objects.filter(name=WATCHLIST_ENTRY).delete()  # created afresh (enabled) when turned on
    return [e for e in entries if e.enabled]


class OutageProofScheduler(DatabaseScheduler):
    """django-celery-beat's scheduler surviving a database outage (#16; `beat_scheduler` in tradebot.celery).

    Every five minutes (and whenever an entry changed) it reads all entries again; with the database down that
    read raised out of beat's loop and beat died (a restart then failed the same way until the database was
    back). Here a failed read keeps the entries read before and is tried again at the next tick: one log line,
    the ticks go on (each cycle_start retries or records its own gap), and the entries are read again once the
    database answers.
    """

    @property
    def schedule(self) -> dict:  # type: ignore[override]
        while True:
            try:
                return super().schedule
            except (OperationalError, InterfaceError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                if self._schedule is not None:
                    logging.getLogger("celery.beat").warning(
                        "beat kept its entries: the database is unavailable (%s: %s); read again at the next tick",
                        type(exc).__name__, first)
                    return self._schedule
                # Starting with the database down: nothing to tick yet, so wait for it (one line a try).
                logging.getLogger("celery.beat").warning(
                    "beat waits for the database to read its entries (%s: %s); trying again in 2 s",
                    type(exc).__name__, first)
                self._initial_read = True
                time.sleep(2)
