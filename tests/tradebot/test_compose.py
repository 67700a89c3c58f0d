"""docker-compose.yml: valid for docker-compose, one worker per queue, all from one image."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import missing_service

ROOT = Path(__file__).resolve().parents[2]


def test_the_stack_has_one_worker_per_queue_beat_flower_and_healthchecks() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for queue in ("okx", "orders", "llm", "reflection", "default"):
        assert f"  worker-{queue}:\n" in text
        assert f'"celery -A tradebot worker -Q {queue} ' in text
    for service in ("timescaledb", "redis", "web", "beat", "flower", "stream"):
        assert f"\n  {service}:\n" in text
    assert '"manage.py", "stream_okx"' in text  # the OKX stream process (issue 19)
    assert "\n  telegram:\n" in text and "exec python manage.py telegram" in text  # alerts and commands (issue 18)
    assert "image: timescale/timescaledb" in text
    assert "--basic-auth" in text and "FLOWER_BASIC_AUTH" in text
    assert text.count("build: .") == 1  # one image, shared through the x-app anchor
    assert text.count("healthcheck:") >= 6
    # web and beat are checked through /health/ (issue 17), the workers by their own Celery ping.
    assert "http://127.0.0.1:8000/health/?format=json" in text
    assert '"manage.py", "health_check", "health-beat", "--no-http"' in text


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:  # .ci/run installs it; a laptop may not have it
        missing_service("docker-compose is not installed (apt-get install docker-compose)")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    (tmp_path / ".env").write_text("FLOWER_BASIC_AUTH=admin:secret\n")
    result = subprocess.run([tool, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # The resolved file keeps the healthchecks that use /health/.
    assert "/health/?format=json" in result.stdout and "health-beat" in result.stdout
