"""What the bench's sections run on: a scratch database, Redis, real Celery workers, options.

The database is chosen ONCE per bench process, before Django starts: a scratch
PostgreSQL database (`tradebot_bench_<pid>`, created, migrated, dropped at the
end) when the server answers, else a scratch SQLite file (the replay section
still runs; the worker sections say why they skip). Redis is used with a key
prefix of its own, so the bench never takes another run's (or a test's) tasks.
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
DB_SECTIONS = frozenset({"pipeline", "instruments300", "replay", "llm_cost", "llm_load", "streams",
                         "learning", "validation", "search", "vs_freqtrade"})


@dataclass
class Options:
    """Command-line settings of the bench (`bench/run.py --help`)."""

    days: float | None = None  # replay: a shorter window than a year (and than the real file)
    cycles: int = 60  # pipeline: cycles per series
    instruments: int = 300  # instruments300: how many instruments
    concurrency: int = 1  # instruments300: processes per worker (1 = solo pool: 4 workers fill 2 cores)
    interval: float = 300.0  # llm_load: seconds between ticks (300 = the real cycle; less compresses time)
    load_cycles: int = 3  # llm_load: ticks (--ticks)
    messages: int = 300_000  # streams: pushes in the throughput run (#19)
    fills: int = 30  # streams: pushed fills timed to their journaled close (#19)
    trials: int = 10  # search: trials per measurement (<= 10: Optuna's random start, the same in both)
    wake_rate: float = 0.25  # llm_cost: the share of position checks the local model answers "wake"
    profile: bool = False  # replay: print a cProfile of the synthetic run
    sqlite: bool = False  # the database sections on a scratch SQLite file even when PostgreSQL answers
    pg_url: str = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
    redis_url: str = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


OPTIONS = Options()


@dataclass
class Environment:
    database: str = ""  # "postgresql" or "sqlite"
    db_name: str = ""
    postgres_missing: str = ""  # why, when PostgreSQL is not usable
    redis_missing: str = ""
    tmp: Path | None = None


ENV = Environment()


def reachable(url: str, default_port: int) -> str:
    """"" when a TCP connection opens, else why not."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or default_port
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return ""
    except OSError as e:
        return f"{host}:{port} is not reachable ({e})"


def load() -> str:
    """The machine's load average, to print beside every figure (the machine is shared)."""
    try:
        one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
        return f"load {one}/{five}/{fifteen} on {os.cpu_count()} cores"
    except OSError:
        return "load unknown"


def cpu_reference() -> str:
    """How fast this machine runs plain Python right now, to read the other figures against.

    The machine is a shared VM whose speed changes between sessions (CPU steal): the
    same code took 4x longer on one day than on another. The best of three runs of
    a 5-million-step integer loop, and the CPU steal over that time, say which day it is.
    """
    def steal() -> tuple[int, int]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            return (fields[7] if len(fields) > 7 else 0), sum(fields)
        except (OSError, ValueError):
            return 0, 0

    s0, t0 = steal()
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        total = 0
        for i in range(5_000_000):
            total += i
        best = min(best, time.perf_counter() - began)
    s1, t1 = steal()
    stolen = f"{100 * (s1 - s0) / (t1 - t0):.0f}% CPU steal" if t1 > t0 else "CPU steal unknown"
    return f"reference loop (5M integer adds, best of 3) {best * 1000:.0f} ms; {stolen} meanwhile"


def _admin_connect():  # noqa: ANN202 - a psycopg connection
    import psycopg

    return psycopg.connect(f"{OPTIONS.pg_url.rstrip('/')}/postgres", autocommit=True, connect_timeout=3)


def prepare(names: list[str]) -> None:
    """Pick and create the database (before django.setup()), then start Django and migrate."""
    ENV.tmp = Path(tempfile.mkdtemp(prefix="tradebot-bench-"))
    atexit.register(shutil.rmtree, ENV.tmp, True)
    # Keep the project's warm numba cache (VAR_DIR would otherwise follow any override).
    os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / "var" / "numba"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradebot.settings")
    # Figures, not a log stream, on the console (the workers keep logging at INFO to their files).
    os.environ.setdefault("LOG_LEVEL", "ERROR")
    ENV.redis_missing = reachable(OPTIONS.redis_url, 6379)
    if not ENV.redis_missing:
        # The sender must talk to the same broker the workers use (not the embedded one).
        os.environ["REDIS_URL"] = OPTIONS.redis_url
    needs_db = any(n in DB_SECTIONS for n in names)
    if needs_db:
        ENV.postgres_missing = "--sqlite was given" if OPTIONS.sqlite else reachable(OPTIONS.pg_url, 5432)
        if not ENV.postgres_missing:
            try:
                ENV.db_name = f"tradebot_bench_{os.getpid()}"
                with _admin_connect() as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{ENV.db_name}"')
                    conn.execute(f'CREATE DATABASE "{ENV.db_name}"')
                atexit.register(cleanup)
                os.environ["DATABASE_URL"] = f"{OPTIONS.pg_url.rstrip('/')}/{ENV.db_name}"
                ENV.database = "postgresql"
            except Exception as e:  # noqa: BLE001 - no PostgreSQL: the worker sections skip and say why
                ENV.postgres_missing = f"cannot create a scratch database: {e}"
                ENV.db_name = ""
        if not ENV.database:
            os.environ["DATABASE_URL"] = f"sqlite:///{ENV.tmp / 'bench.sqlite3'}"
            ENV.database = "sqlite"
    import django

    django.setup()
    if needs_db:
        from django.core.management import call_command

        t = time.perf_counter()
        call_command("migrate", verbosity=0)
        where = ENV.db_name if ENV.database == "postgresql" else "a scratch SQLite file"
        print(f"(bench database: {ENV.database} {where}, migrated in {time.perf_counter() - t:.1f} s"
              + (f"; PostgreSQL unusable: {ENV.postgres_missing}" if ENV.postgres_missing else "") + ")")


def cleanup() -> None:
    """Drop the scratch PostgreSQL database (idempotent; also runs at exit)."""
    if not ENV.db_name:
        return
    name, ENV.db_name = ENV.db_name, ""
    try:
        from django.db import connections

        connections.close_all()
    except Exception:  # noqa: BLE001 - Django may not have started
        pass
    try:
        with _admin_connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as e:  # noqa: BLE001 - say so; the name says what to drop by hand
        print(f"could not drop the scratch database {name}: {e}")


def worker_sections_missing() -> str:
    """Why the worker sections cannot run here, or ""."""
    if ENV.database != "postgresql":
        return f"PostgreSQL is needed ({ENV.postgres_missing or 'not configured'})"
    if ENV.redis_missing:
        return f"Redis is needed ({ENV.redis_missing})"
    return ""


def workers_start(*, feed: str, pool: str = "solo", concurrency: int = 1, instruments: list[str] | None = None):  # noqa: ANN201
    """Real Celery workers, one per queue, on Redis and the scratch database (tests' starter)."""
    from tests.tradebot.workers import Workers

    tmp = Path(tempfile.mkdtemp(prefix="workers-", dir=ENV.tmp))
    extra = {
        "BENCH_FEED": feed,
        "NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"],
        # The default lets a worker restart within seconds in the tests; here a task waits in a reserved
        # slot behind hundreds of others and must not be handed out twice.
        "CELERY_VISIBILITY_TIMEOUT": "3600",
    }
    if instruments:
        (tmp / "instruments.txt").write_text("\n".join(instruments))
        extra["BENCH_INSTRUMENTS_FILE"] = str(tmp / "instruments.txt")
    workers = Workers(redis_url=OPTIONS.redis_url, tmp=tmp, app_module="bench.worker_app",
                      prefix=f"tbbench{os.getpid()}:", pool=pool, concurrency=concurrency,
                      visibility_timeout=3600, extra_env=extra, ready_timeout=300.0)
    workers.start_all()
    return workers


def workers_start_queues(named: dict[str, str]):  # noqa: ANN201 - tests.tradebot.workers.Workers
    """Real Celery workers of the project's own app (`-A tradebot`), named by the keys, on the queues of the values
    (`search`: one or two on `reflection`); more join with `.start_as(...)`."""
    from tests.tradebot.workers import Workers

    tmp = Path(tempfile.mkdtemp(prefix="workers-", dir=ENV.tmp))
    workers = Workers(redis_url=OPTIONS.redis_url, tmp=tmp, prefix=f"tbbench{os.getpid()}:", visibility_timeout=3600,
                      extra_env={"NUMBA_CACHE_DIR": os.environ["NUMBA_CACHE_DIR"], "CELERY_VISIBILITY_TIMEOUT": "3600"},
                      ready_timeout=300.0)
    workers.start_as(**named)
    return workers
