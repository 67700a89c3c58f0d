"""Real Celery workers for the pipeline tests: one subprocess per queue on Redis (okx, orders, llm, reflection,
default: `tradebot.celery.QUEUES`).

Each run gets its own Redis key prefix, so two test runs on one Redis never
take each other's tasks; the workers talk to the pytest test database.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from django.conf import settings
from django.db import connection

from tradebot.celery import QUEUES, app

ROOT = Path(__file__).resolve().parents[2]


class Workers:
    """Worker subprocesses, one per queue.

    The defaults are the tests' (`-A tradebot`, solo pool, a 3 s visibility
    timeout so a killed worker's task comes back quickly); the benchmark
    (`bench/run.py`) passes its own app module, pool and concurrency.
    """

    def __init__(self, *, redis_url: str, tmp: Path, app_module: str = "tradebot", prefix: str | None = None,
                 pool: str = "solo", concurrency: int = 1, visibility_timeout: int = 3,
                 extra_env: dict[str, str] | None = None, ready_timeout: float = 90.0,
                 pools: dict[str, tuple[str, int]] | None = None) -> None:
        db = settings.DATABASES["default"]
        user = db.get("USER") or "postgres"
        auth = f"{user}:{db['PASSWORD']}@" if db.get("PASSWORD") else f"{user}@"
        self.database_url = f"postgres://{auth}{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{connection.settings_dict['NAME']}"
        self.redis_url = redis_url
        self.prefix = prefix or f"tbtest{os.getpid()}:"
        self.tmp = tmp
        self.app_module = app_module
        self.pool = pool
        self.concurrency = concurrency
        # queue -> (pool, concurrency), e.g. {"llm": ("threads", 8), "orders": ("prefork", 2)} as runbot starts them
        self.pools = pools or {}
        self.ready_timeout = ready_timeout
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._redis = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("OKX_API", "OKX_PASS", "ANTHROPIC", "PERPLEXITY"))}
        self.env.update({
            "DATABASE_URL": self.database_url,
            "REDIS_URL": redis_url,
            "CELERY_REDIS_KEY_PREFIX": self.prefix,
            "CELERY_VISIBILITY_TIMEOUT": str(visibility_timeout),
            "MARKET_DATA_SOURCE": "synthetic",
            "BRAIN": "rules",
            "TRADEBOT_VAR_DIR": str(tmp),
            "PYTHONPATH": str(ROOT),
            "LOG_LEVEL": "INFO",
        })
        self.env.update(extra_env or {})
        # This process sends to the same broker with the same prefix.
        app.conf.broker_url = redis_url
        app.conf.broker_transport_options = {"visibility_timeout": visibility_timeout, "global_keyprefix": self.prefix}
        # Rebuild the connection and producer pools with the new broker settings.
        app._pool = None  # noqa: SLF001
        app.amqp._producer_pool = None  # noqa: SLF001

    def log_path(self, queue: str) -> Path:
        return self.tmp / f"worker-{queue}.log"

    def start(self, *queues: str) -> None:
        """Start workers (in parallel) and wait until each says it is ready."""
        self.start_as(**{queue: queue for queue in queues})

    def start_as(self, **named: str) -> None:
        """Start workers named by the keys, each consuming the queue its value names (two on one queue:
        `start_as(reflection="reflection", reflection2="reflection")`); `kill(name)` stops one."""
        markers = {}
        for name, queue in named.items():
            path = self.log_path(name)
            path.touch()
            markers[name] = path.stat().st_size
            log = open(path, "ab")  # noqa: SIM115 - the child writes to it
            pool, concurrency = self.pools.get(queue, (self.pool, self.concurrency))
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", self.app_module, "worker", "-Q", queue,
                 "-n", f"{name}@{self.prefix[:-1]}", "-P", pool,
                 *(["-c", str(concurrency)] if pool != "solo" else []),
                 "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.ready_timeout
        waiting = set(named)
        while waiting and time.monotonic() < deadline:
            for queue in list(waiting):
                text = self.log_path(queue).read_bytes()[markers[queue]:]
                if b"ready." in text:
                    waiting.discard(queue)
                elif self.procs[queue].poll() is not None:
                    raise RuntimeError(f"worker {queue} exited: {text.decode(errors='replace')[-3000:]}")
            time.sleep(0.1)
        if waiting:
            raise RuntimeError(f"workers {sorted(waiting)} not ready in {self.ready_timeout:.0f} s")

    def start_all(self) -> None:
        self.start(*QUEUES)

    def kill(self, queue: str) -> None:
        proc = self.procs.pop(queue)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        procs = [self.procs.pop(q) for q in list(self.procs)]
        for proc in procs:
            proc.send_signal(signal.SIGQUIT)  # cold shutdown: the tests are over
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        try:
            client = self.redis()
            keys = list(client.scan_iter(match=f"{self.prefix}*"))
            if keys:
                client.delete(*keys)
        except Exception:  # noqa: BLE001 - cleanup is best effort
            pass

    def redis(self):  # noqa: ANN201 - a redis.Redis
        """One client for this process's looks at the broker (made on first use)."""
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.redis_url)
        return self._redis

    def queue_lengths(self) -> dict[str, int]:
        client = self.redis()
        return {q: int(client.llen(f"{self.prefix}{q}")) for q in QUEUES}

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no task is queued or running: every queue empty and nothing unacknowledged.

        Every task acks late, so a task a worker holds (running, or waiting for
        its retry countdown) stays in the transport's `unacked` hash until it
        ends. A test's teardown flushes the database with TRUNCATE; a task still
        writing then (a post-trade review queued by the test's last step) can
        deadlock with it and leave the next test the rows. A message moves from
        its queue to `unacked` in two steps, so idle must be seen three times.
        """
        client = self.redis()
        deadline = time.monotonic() + timeout
        seen_idle = 0
        while seen_idle < 3:
            busy = {q: n for q, n in self.queue_lengths().items() if n}
            unacked = int(client.hlen(f"{self.prefix}unacked"))
            if unacked:
                busy["unacked"] = unacked
            seen_idle = 0 if busy else seen_idle + 1
            if busy and time.monotonic() > deadline:
                raise AssertionError(f"workers still busy after {timeout:.0f} s: {busy}\n{self.worker_logs()}")
            time.sleep(0.05)

    def worker_logs(self) -> str:
        return "\n".join(f"--- {path.stem.removeprefix('worker-')}\n" + path.read_text(errors="replace")[-4000:]
                         for path in sorted(self.tmp.glob("worker-*.log")))


def redis_reachable(url: str) -> bool:
    import socket

    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 6379), timeout=0.5):
            return True
    except OSError:
        return False


def workers_made(django_db_blocker, tmp_path_factory, name: str, **kwargs) -> Workers:  # noqa: ANN001
    """A set of workers on the test Redis, in a fresh folder `name` (not started). Without Redis the test skips,
    or fails under REQUIRE_SERVICES=1; the database is open to it while it is built."""
    from tests.conftest import missing_service, redis_url

    url = redis_url()
    if not redis_reachable(url):
        missing_service(f"Redis is not reachable at {url}")
    with django_db_blocker.unblock():
        return Workers(redis_url=url, tmp=tmp_path_factory.mktemp(name), **kwargs)
