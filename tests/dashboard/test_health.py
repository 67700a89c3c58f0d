"""`/health/` (django-health-check): JSON with one line per check and a status a load balancer reads (200 / 500).

Here, without workers: what fails is named. With real workers on Redis:
tests/dashboard/test_health_and_flower_workers.py.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

pytestmark = pytest.mark.django_db


@pytest.fixture
def embedded(settings, tmp_path):  # noqa: ANN001, ANN201
    """The embedded broker in a folder of this test's own; the pings wait 0.2 s for workers that never answer."""
    settings.REDIS_URL = ""
    (tmp_path / "queue").mkdir()
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS,
                                                "data_folder_in": str(tmp_path / "queue")}
    settings.HEALTH_PING_TIMEOUT_SECONDS = 0.2
    return tmp_path


def _beat_entry(last_run_at) -> PeriodicTask:  # noqa: ANN001
    every = IntervalSchedule.objects.create(every=15, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name="account sync", task="tradebot.tasks.account_sync", interval=every,
                                       last_run_at=last_run_at)


def test_without_workers_or_beat_health_is_a_500_whose_json_names_each_failed_check(client, embedded) -> None:
    response = client.get("/health/", HTTP_ACCEPT="application/json")
    assert response.status_code == 500 and response["Content-Type"] == "application/json"
    checks = response.json()
    assert checks["Database(alias='default')"] == "OK"
    assert checks[f"EmbeddedBroker(folder='{embedded / 'queue'}')"] == "OK"
    assert "beat has never ticked" in checks["Beat(max_age_seconds=600)"]
    for queue in ("okx", "orders", "llm", "reflection", "default"):
        assert checks[f"QueueWorker(queue='{queue}')"].startswith("Unavailable"), checks
    # No login needed (a load balancer has none), and never cached.
    assert "no-cache" in response["Cache-Control"]


def test_beats_check_passes_on_a_recent_tick_and_fails_on_a_stale_one_with_its_age(client, embedded, settings) -> None:
    entry = _beat_entry(timezone.now() - timedelta(seconds=30))
    response = client.get("/health/beat/?format=json")
    assert response.status_code == 200 and response.json() == {"Beat(max_age_seconds=600)": "OK"}
    entry.last_run_at = timezone.now() - timedelta(minutes=20)
    entry.save()
    response = client.get("/health/beat/?format=json")
    assert response.status_code == 500
    assert "beat's last tick was 1200 s ago" in response.json()["Beat(max_age_seconds=600)"]
    entry.enabled = False  # a disabled entry's old run says nothing about beat
    entry.last_run_at = timezone.now()
    entry.save()
    assert "never ticked" in client.get("/health/beat/?format=json").json()["Beat(max_age_seconds=600)"]


def test_a_missing_broker_folder_is_named(client, embedded, settings) -> None:
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {**settings.CELERY_BROKER_TRANSPORT_OPTIONS,
                                                "data_folder_in": str(embedded / "gone")}
    checks = client.get("/health/?format=json").json()
    assert "does not exist" in checks[f"EmbeddedBroker(folder='{embedded / 'gone'}')"]


def _stream(name: str, *, connected: bool = True, age_seconds: int = 0, error: str = "") -> None:
    from market.models import StreamStatus

    StreamStatus.objects.update_or_create(name=name, defaults={
        "connected": connected, "error": error, "reconnects": 0 if connected else 3,
        "updated_at": timezone.now() - timedelta(seconds=age_seconds)})


STREAMS = "Streams(setting='{}')"


def test_the_streams_check_is_critical_where_the_okx_stream_is_expected_and_names_what_is_down(
        client, embedded, settings) -> None:
    settings.HEALTH_STREAMS, settings.MARKET_DATA_SOURCE, settings.STREAM_FRESH_SECONDS = "auto", "okx", 120
    key = STREAMS.format("auto")
    response = client.get("/health/streams/?format=json")
    assert response.status_code == 500 and "manage.py stream_okx is not running" in response.json()[key]
    _stream("public")
    _stream("business")
    response = client.get("/health/streams/?format=json")
    assert response.status_code == 200 and response.json() == {key: "OK"}
    _stream("business", connected=False, error="ConnectionClosed")
    response = client.get("/health/streams/?format=json")
    assert response.status_code == 500
    assert response.json()[key] == "Unavailable: business: disconnected, reconnecting (3 reconnects): ConnectionClosed"
    _stream("business")
    _stream("public", age_seconds=600)  # the process stopped writing: its status is old
    assert "public: status 600s old" in client.get("/health/streams/?format=json").json()[key]
    # The whole stack's /health/ carries the same line.
    assert "public: status 600s old" in client.get("/health/?format=json").json()[key]


def test_the_streams_check_passes_where_no_stream_is_expected_and_follows_health_streams(
        client, embedded, settings) -> None:
    settings.STREAM_FRESH_SECONDS = 120
    for source in ("synthetic", "replay", "auto"):  # auto: no stream has ever written its status here
        settings.HEALTH_STREAMS, settings.MARKET_DATA_SOURCE = "auto", source
        response = client.get("/health/streams/?format=json")
        assert response.status_code == 200 and response.json() == {STREAMS.format("auto"): "OK"}, source
    settings.HEALTH_STREAMS = "yes"  # required even on the synthetic market
    settings.MARKET_DATA_SOURCE = "synthetic"
    assert client.get("/health/streams/?format=json").status_code == 500
    _stream("public", connected=False)
    settings.MARKET_DATA_SOURCE = "auto"  # compose: a stream has written its status here, so it is expected
    settings.HEALTH_STREAMS = "auto"
    response = client.get("/health/streams/?format=json")
    assert response.status_code == 500 and "public: disconnected" in response.json()[STREAMS.format("auto")]
    settings.HEALTH_STREAMS = "no"  # never critical
    assert client.get("/health/streams/?format=json").json() == {STREAMS.format("no"): "OK"}
    settings.HEALTH_STREAMS, settings.MARKET_DATA_SOURCE = "auto", "synthetic"  # stream_okx cannot run there
    assert client.get("/health/streams/?format=json").status_code == 200
