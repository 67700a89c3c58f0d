"""Shared test fixtures: the real-data directory, service checks, Hypothesis profiles.

`make test` runs two passes: everything not marked `postgres` on SQLite, then
the `postgres` tests with DATABASE_URL pointing at the local PostgreSQL. Where
PostgreSQL or Redis is missing, those tests skip with the reason printed;
with REQUIRE_SERVICES=1 (CI) they fail instead.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
IN_CI_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") == "ci"


def services_required() -> bool:
    return os.environ.get("REQUIRE_SERVICES", "") in {"1", "true", "yes"}


def missing_service(reason: str) -> None:
    """Skip (on a laptop) or fail (in CI) a test whose service is not there."""
    if services_required():
        pytest.fail(f"{reason} (REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


TEST_KEY = "sk-ant-test-key-0123456789"


@pytest.fixture(autouse=True)
def _account_sync_failures_reset():  # noqa: ANN202 - a generator fixture
    """The worker process counts failed account syncs until one reaches the database (tradebot.tasks); a test that
    failed a sync must not hand its count to the next test."""
    yield
    tasks = sys.modules.get("tradebot.tasks")
    if tasks is not None:
        tasks._SYNC_FAILURES.update(count=0, first="", why="")  # noqa: SLF001 - the process-wide counter




def reset_fake_server(server) -> None:  # noqa: ANN001 - any tests.fakes server
    # One server per session (starting and stopping one per test costs ~0.5 s each).
    with server._lock:
        server.requests.clear()
        server._routes.clear()


@pytest.fixture(scope="session")
def _anthropic_session():  # noqa: ANN202
    from tests.fakes.anthropic_server import FakeAnthropic

    with FakeAnthropic() as server:
        yield server


@pytest.fixture
def anthropic_server(settings, _anthropic_session):  # noqa: ANN001, ANN201
    """The Claude brain talking to the local Messages API server (one per session, emptied per test)."""
    reset_fake_server(_anthropic_session)
    settings.ANTHROPIC_API_KEY = TEST_KEY
    settings.ANTHROPIC_BASE_URL = _anthropic_session.url
    settings.BRAIN = "claude"
    yield _anthropic_session
    reset_fake_server(_anthropic_session)


@pytest.fixture
def shared_data() -> Path:
    """The real market data beside the project; tests that need it skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real market data not found at {SHARED_DATA} (../shared/data is only beside a checkout)")
    return SHARED_DATA


@pytest.fixture
def okx_samples(shared_data: Path) -> Path:
    return shared_data / "okx_api"


@pytest.fixture
def require_redis() -> str:
    url = redis_url()
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if not port_open(parsed.hostname or "127.0.0.1", parsed.port or 6379):
        missing_service(f"Redis is not reachable at {parsed.hostname}:{parsed.port or 6379}")
    return url


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from django.conf import settings as dj

    pg_items = [item for item in items if item.get_closest_marker("postgres")]
    if not pg_items:
        return
    db = dj.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        # The SQLite pass: these belong to the PostgreSQL pass (make test-postgres).
        reason = "needs PostgreSQL: run with DATABASE_URL=postgres://... (make test-postgres)"
    elif not port_open(str(db.get("HOST") or "127.0.0.1"), int(db.get("PORT") or 5432)):
        reason = f"PostgreSQL is not reachable at {db.get('HOST')}:{db.get('PORT') or 5432}"
        if services_required():
            raise pytest.UsageError(f"{reason} (REQUIRE_SERVICES=1)")
    else:
        return
    for item in pg_items:
        item.add_marker(pytest.mark.skip(reason=reason))
