"""`/health/` for load balancers and the compose healthchecks, built on django-health-check (pinned).

`/health/` runs every check at once: the database (the library's `SELECT 1`), the broker (the library's
Redis ping, or the embedded broker's folders), beat's last tick (the newest `last_run_at` of the enabled
beat entries), the OKX streams (`manage.py stream_okx`'s connections; critical only where the stream is
expected, see `streams_expected`) and a live worker on each queue (the library's Celery ping, one check
per queue). It answers 200 when every check passes and 500 when one fails (the library's statuses, which
load balancers and `manage.py health_check` read); `?format=json` or `Accept: application/json` gives one
line per check, "OK" or why not. `/health/beat/` is beat's check alone: the compose beat container runs
it in-process (`manage.py health_check health-beat --no-http`); `/health/streams/` is the streams' alone.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterable
from typing import Any

import celery
from django.conf import settings
from django.db.models import Max
from django.urls import path
from django.utils import timezone
from health_check import Database
from health_check.base import HealthCheck
from health_check.contrib.celery import Ping
from health_check.contrib.redis import Redis
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView


def _app() -> celery.Celery:
    from tradebot.celery import app

    return app


@dataclasses.dataclass
class Beat(HealthCheck):
    """Beat is alive when an enabled entry ran recently. django-celery-beat writes `last_run_at` when it
    syncs its schedule (every 3 minutes, and the account sync ticks every ACCOUNT_SYNC_SECONDS), so the
    limit (HEALTH_BEAT_MAX_AGE_SECONDS) must be longer than that."""

    max_age_seconds: int = dataclasses.field(default_factory=lambda: settings.HEALTH_BEAT_MAX_AGE_SECONDS)

    async def run(self) -> None:
        from django_celery_beat.models import PeriodicTask

        # The async ORM runs in the request's own thread and connection (never a stray pool thread's).
        last = (await PeriodicTask.objects.filter(enabled=True).aaggregate(last=Max("last_run_at")))["last"]
        if last is None:
            raise ServiceUnavailable("beat has never ticked: no enabled beat entry has run (is beat running?)")
        age = (timezone.now() - last).total_seconds()
        if age > self.max_age_seconds:
            raise ServiceUnavailable(f"beat's last tick was {age:.0f} s ago (at {last:%Y-%m-%d %H:%M:%S} UTC), "
                                     f"more than {self.max_age_seconds} s")


@dataclasses.dataclass
class QueueWorker(Ping):
    """The library's Celery ping, narrowed to one queue: some worker that answers the ping consumes it."""

    app: celery.Celery = dataclasses.field(default_factory=_app, repr=False)
    timeout: datetime.timedelta = dataclasses.field(
        default_factory=lambda: datetime.timedelta(seconds=settings.HEALTH_PING_TIMEOUT_SECONDS), repr=False)
    queue: str = "default"

    def check_active_queues(self, *active_workers: str) -> None:
        replies = self.app.control.inspect(list(active_workers), timeout=self.timeout.total_seconds()).active_queues()
        consumers = [w for w, queues in (replies or {}).items() if any(q.get("name") == self.queue for q in queues)]
        if not consumers:
            raise ServiceUnavailable(f"no live worker consumes the {self.queue} queue "
                                     f"({len(active_workers)} worker(s) answered the ping)")


@dataclasses.dataclass
class EmbeddedBroker(HealthCheck):
    """The embedded broker (kombu's filesystem transport, no server): its queue folder must be there and
    writable by this process."""

    folder: str = dataclasses.field(
        default_factory=lambda: str(settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("data_folder_in", "")))

    def run(self) -> None:
        if not os.path.isdir(self.folder):
            raise ServiceUnavailable(f"the embedded broker's folder {self.folder} does not exist (no worker started?)")
        if not os.access(self.folder, os.W_OK):
            raise ServiceUnavailable(f"the embedded broker's folder {self.folder} is not writable")


def _redis_client() -> Any:
    from redis.asyncio import Redis as RedisClient

    # Short timeouts: a dead Redis must not hold the load balancer's probe.
    return RedisClient.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)


def broker_check() -> tuple[type[HealthCheck], dict[str, Any]]:
    if settings.REDIS_URL:
        return Redis, {"client_factory": _redis_client}
    return EmbeddedBroker, {}


class StackHealthView(HealthCheckView):
    """Every check of the stack; the checks are chosen per request (the broker follows the settings)."""

    def get_checks(self) -> Iterable[HealthCheck]:
        from tradebot.celery import QUEUES

        # Not the library's default list (cache, DNS, mail, storage): this stack's parts.
        broker, options = broker_check()
        yield Database()
        yield broker(**options)
        yield Beat()
        yield Streams()
        for queue in QUEUES:
            yield QueueWorker(queue=queue)


def streams_expected(*, setting: str, market_data_source: str, has_status: bool) -> bool:
    """Whether the OKX stream should be running here (HEALTH_STREAMS): "yes"/"no" say so; "auto" expects it on
    OKX's market (MARKET_DATA_SOURCE=okx: `make run` starts it and sets that for its children), never on the
    synthetic or replayed market (stream_okx refuses to run there), and with MARKET_DATA_SOURCE=auto (compose's
    `stream` service) once a stream has written its status in this database."""
    if setting in ("yes", "no"):
        return setting == "yes"
    if market_data_source == "okx":
        return True
    return market_data_source == "auto" and has_status


@dataclasses.dataclass
class Streams(HealthCheck):
    """`manage.py stream_okx`'s connections, as `bot status` reads them (market.selectors.streams_health): each
    must be up and its status fresh (STREAM_FRESH_SECONDS). Critical only where the stream is expected
    (`streams_expected`); elsewhere it passes whatever the rows say (a stream is optional: COLLECTING falls
    back to REST)."""

    setting: str = dataclasses.field(default_factory=lambda: settings.HEALTH_STREAMS)

    async def run(self) -> None:
        from asgiref.sync import sync_to_async

        from market.selectors import streams_health

        # Thread-sensitive: the ORM read runs in the request's own thread and connection, as Beat's.
        health = await sync_to_async(streams_health)()
        if not streams_expected(setting=self.setting, market_data_source=settings.MARKET_DATA_SOURCE,
                                has_status=bool(health["streams"])):
            return
        if not health["streams"]:
            raise ServiceUnavailable("no OKX stream has run here: manage.py stream_okx is not running "
                                     f"(expected: HEALTH_STREAMS={self.setting}, "
                                     f"MARKET_DATA_SOURCE={settings.MARKET_DATA_SOURCE})")
        if not health["ok"]:
            raise ServiceUnavailable("; ".join(health["problems"]) or "manage.py stream_okx is not running")


class BeatHealthView(HealthCheckView):
    def get_checks(self) -> Iterable[HealthCheck]:
        yield Beat()


class StreamsHealthView(HealthCheckView):
    def get_checks(self) -> Iterable[HealthCheck]:
        yield Streams()


urlpatterns = [
    path("", StackHealthView.as_view(), name="health"),
    path("beat/", BeatHealthView.as_view(), name="health-beat"),
    path("streams/", StreamsHealthView.as_view(), name="health-streams"),
]
