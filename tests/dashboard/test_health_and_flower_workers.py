"""`/health/` and Flower against REAL Celery workers (one per queue) on the test Redis and PostgreSQL.

Flower starts as `make run` starts it (`celery -A tradebot flower`), its basic auth read from the environment
(FLOWER_BASIC_AUTH, never on the command line): a request without the credentials is refused, one with them
lists the running workers. `/health/` answers 200 with every check OK while a worker consumes each queue and
beat ticked, and 500 naming the queue once its worker is gone.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from django.utils import timezone

from tests.tradebot.workers import ROOT, Workers, workers_made

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]
FLOWER_AUTH = ("flower-user", "flower-secret-pw")


@pytest.fixture(scope="module")
def workers(django_db_setup, django_db_blocker, tmp_path_factory):  # noqa: ANN001, ANN201
    w = workers_made(django_db_blocker, tmp_path_factory, "workers")
    w.start_all()
    yield w
    w.stop_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def flower(workers: Workers, tmp_path: Path):  # noqa: ANN201
    port = _free_port()
    log = tmp_path / "flower.log"
    env = {**workers.env, "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tradebot", "flower", "--address=127.0.0.1",
                                 f"--port={port}"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"flower exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"flower not answering in 60 s: {log.read_text()[-3000:]}"
            try:
                httpx.get(f"{base}/healthcheck", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert ":".join(FLOWER_AUTH) not in " ".join(proc.args)  # the password is not in `ps`


def test_flower_refuses_a_request_without_credentials_and_lists_the_running_workers_with_them(
        workers: Workers, flower: str) -> None:
    for path in ("/", "/api/workers", "/workers"):
        assert httpx.get(f"{flower}{path}", timeout=10).status_code == 401, path
    assert httpx.get(f"{flower}/api/workers", auth=("flower-user", "wrong"), timeout=10).status_code == 401
    listed = httpx.get(f"{flower}/api/workers?refresh=1", auth=FLOWER_AUTH, timeout=30)
    assert listed.status_code == 200, listed.text[:500]
    names = {f"{queue}@{workers.prefix[:-1]}" for queue in ("okx", "orders", "llm", "reflection", "default")}
    assert names <= set(listed.json()), listed.json().keys()
    queues = {name: {q["name"] for q in info.get("active_queues") or []} for name, info in listed.json().items()}
    assert queues[f"llm@{workers.prefix[:-1]}"] == {"llm"}


def test_health_is_200_with_every_check_ok_and_500_naming_the_queue_whose_worker_is_gone(
        client, workers: Workers, settings) -> None:  # noqa: ANN001
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    settings.REDIS_URL = workers.redis_url
    settings.MARKET_DATA_SOURCE, settings.HEALTH_STREAMS = "synthetic", "auto"  # no OKX stream expected here
    every = IntervalSchedule.objects.create(every=15, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="account sync", task="tradebot.tasks.account_sync", interval=every,
                                last_run_at=timezone.now() - timedelta(seconds=20))
    response = client.get("/health/", HTTP_ACCEPT="application/json")
    checks = response.json()
    assert response.status_code == 200, checks
    assert set(checks.values()) == {"OK"} and len(checks) == 9, checks  # database, broker, beat, 5 queues, streams
    assert "Streams(setting='auto')" in checks
    assert any(name.startswith("Redis(") for name in checks)

    workers.kill("llm")
    response = client.get("/health/?format=json")
    checks = response.json()
    assert response.status_code == 500
    assert "no live worker consumes the llm queue" in checks["QueueWorker(queue='llm')"]
    assert [name for name, verdict in checks.items() if verdict != "OK"] == ["QueueWorker(queue='llm')"]
